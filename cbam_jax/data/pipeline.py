"""grain pipelines: an endless shuffled training stream of fixed-size batches, and padded eval batches.

Multi-host: the global stream is cut into global batches and process p reads (and decodes) only
the p-th contiguous part of each, `global_batch / process_count` examples; the trainer assembles
the global batch with `jax.make_array_from_process_local_data`, so the global batches are the same
whatever the number of processes.
"""

import functools
import math
import os
import warnings
from collections.abc import Iterator

import grain
import ml_collections
import numpy as np

from cbam_jax.data import transforms
from cbam_jax.data.sources import ArraySource, ImageFolderSource, class_folders, digits_source, tfds_source
from cbam_jax.errors import InvalidInput
from cbam_jax.images import Preprocessing, ensure_channels, resize, resize_and_crop


def make_source(dataset: ml_collections.ConfigDict, split: str):
    """The random-access source of `split` for the config's `dataset` group."""
    if dataset.source == "digits":
        return digits_source(split)
    if dataset.source == "tfds":
        return tfds_source(dataset.name, split, dataset.data_dir)
    root = os.path.expanduser(dataset.data_dir)
    train_root = os.path.join(root, dataset.train_split)
    # Class names come from the training split, so that a split lacking a class keeps the others' labels.
    classes = class_folders(train_root) if split != dataset.train_split and os.path.isdir(train_root) else None
    return ImageFolderSource(os.path.join(root, split), dataset.channels, verify=dataset.verify_images,
                             classes=classes or None)


# Examples read to check a source whose labels are not known without reading it (tfds without label
# names): enough to catch a wrong num_classes on most data sets, cheap enough to do before every run.
LABEL_SAMPLE = 512


def check_source(source, dataset: ml_collections.ConfigDict, split: str) -> None:
    """Refuse a split that does not fit the config before anything trains: no examples, labels outside
    [0, dataset.num_classes), images whose shape or channels the pipeline cannot make into
    (image_size, image_size, channels). Labels are read whole where the source holds them (arrays,
    image folders, tfds label names), else from the first LABEL_SAMPLE examples.

    Raises:
      InvalidInput: naming the split, the numbers and the config field to change.
    """
    where = f"split {split!r} of config.dataset (source {dataset.source!r})"
    if len(source) == 0:
        raise InvalidInput(f"{where} has no examples; point config.dataset at a split with data.")
    num_classes = dataset.num_classes
    if isinstance(source, ArraySource):
        labels = source.labels
    elif isinstance(source, ImageFolderSource):
        labels = np.unique([label for _, label in source.files])
        if len(source.classes) > num_classes:
            raise InvalidInput(f"{where} has {len(source.classes)} class folders but config.dataset.num_classes = "
                               f"{num_classes}; set --config.dataset.num_classes={len(source.classes)}.")
        if len(source.classes) == 1:  # e.g. data_dir/train/images/CLASS/...: one folder level too many
            raise InvalidInput(f"{where} has a single class folder ({source.classes[0]!r}): a one-class problem. Is "
                               f"there one folder level too many? Expected {dataset.data_dir}/{split}/CLASS_NAME/image.jpg.")
        if len(source.classes) < num_classes / 2:
            warnings.warn(f"{where} has {len(source.classes)} class folders, far fewer than config.dataset.num_classes = "
                          f"{num_classes}; set --config.dataset.num_classes={len(source.classes)} unless that is meant.",
                          stacklevel=2)
    else:
        labels = _known_labels(source)
        if labels is None:
            labels = np.asarray([source[i]["label"] for i in range(min(len(source), LABEL_SAMPLE))])
    labels = np.asarray(labels)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise InvalidInput(f"{where} has labels outside [0, {num_classes}) (e.g. {int(outside.min())} and "
                           f"{int(outside.max())}, {outside.size} of {labels.size} read) while config.dataset.num_classes = "
                           f"{num_classes}; set --config.dataset.num_classes={int(labels.max()) + 1} or fix the labels.")
    image = np.asarray(source[0]["image"])
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)) or 0 in image.shape:
        raise InvalidInput(f"{where}: its images have shape {image.shape}; expected (H, W) or (H, W, 1|3|4) to make "
                           f"into config.dataset.image_size = {dataset.image_size}, channels = {dataset.channels}.")
    if image.dtype != np.uint8:
        raise InvalidInput(f"{where}: its images are {image.dtype}; the pipeline reads uint8 images (0..255).")


def _known_labels(source) -> np.ndarray | None:
    """All labels a tfds source declares (range(num_classes) of its label feature), None if it does not say."""
    try:
        declared = int(source.dataset_info.features["label"].num_classes)
    except Exception:  # no info or no class label feature: read a sample instead
        return None
    return np.arange(declared)


def eval_preprocessing(dataset: ml_collections.ConfigDict) -> Preprocessing:
    """The eval preprocessing of the config's `dataset` group: what `eval_batches` does to every image
    before the step normalises it, and what a training run's exported model records for `cbam-jax predict`.

    `eval_resize == 0` resizes the whole image to image_size x image_size (aspect not kept);
    otherwise the short side goes to `eval_resize`, then a center crop of image_size.
    """
    size = dataset.image_size
    return Preprocessing(resize=(size, size) if dataset.eval_resize <= 0 else dataset.eval_resize, crop=size,
                         mean=tuple(float(v) for v in dataset.mean), std=tuple(float(v) for v in dataset.std),
                         channels=dataset.channels)


def _train_example(example: dict, rng: np.random.Generator, dataset: ml_collections.ConfigDict) -> dict:
    image = ensure_channels(np.asarray(example["image"]), dataset.channels)
    size = dataset.image_size
    if dataset.train_augment == "pad_crop":
        image = transforms.pad_crop(image, rng, size, dataset.crop_padding)
    elif dataset.train_augment == "random_resized_crop":
        image = transforms.random_resized_crop(image, rng, size)
    else:
        image = resize(image, size, size)
    if dataset.flip:
        image = transforms.maybe_flip(image, rng)
    return {"image": np.ascontiguousarray(image), "label": np.int32(example["label"])}


def _eval_example(example: dict, preprocessing: Preprocessing) -> dict:
    image = resize_and_crop(ensure_channels(np.asarray(example["image"]), preprocessing.channels), preprocessing)
    return {"image": np.ascontiguousarray(image), "label": np.int32(example["label"])}


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise InvalidInput(f"Batch size {global_batch} is not divisible by the {process_count} processes; "
                         f"use a multiple of {process_count}.")
    return global_batch // process_count


def train_dataset(source, dataset: ml_collections.ConfigDict, *, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Endless training batches {'image': uint8 (B, H, W, C), 'label': int32 (B,)} of this process.

    Each epoch is a fresh global permutation (seeded), sliced per process; augmentation randomness
    is derived from (seed, example position), so the stream is identical however it is read, and
    the iterator's `get_state()` / `set_state()` resume it exactly.
    """
    batch = local_batch_size(global_batch, process_count)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    # Randomness from the global position, so augmentation does not depend on the process count.
    ds = ds.random_map(functools.partial(_train_example, dataset=dataset), seed=seed)
    ds = _ProcessPart(ds, global_batch, process_index, process_count)
    ds = ds.batch(batch, drop_remainder=True)
    options = grain.ReadOptions(num_threads=dataset.num_threads, prefetch_buffer_size=dataset.prefetch * batch)
    return ds.to_iter_dataset(options)


class _ProcessPart(grain.MapDataset):
    """The elements of this process: part `process_index` of every consecutive global batch."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.offset = process_index * self.local_batch

    def __len__(self) -> int:
        return len(self._parent) // self.global_batch * self.local_batch

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, within = divmod(index, self.local_batch)
        return self._parent[batch * self.global_batch + self.offset + within]

    def __str__(self) -> str:
        return f"_ProcessPart(offset={self.offset}, local_batch={self.local_batch})"


def num_eval_batches(num_examples: int, global_batch: int, process_count: int = 1) -> int:
    """Batches per process so that every process runs the same number (needed by collectives)."""
    per_process = math.ceil(num_examples / process_count)
    return max(1, math.ceil(per_process / local_batch_size(global_batch, process_count)))


def eval_batches(source, dataset: ml_collections.ConfigDict, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """Eval batches of this process padded to full size: {'image', 'label', 'mask' (B,) bool}.

    Padding examples have mask False, so every real example is counted exactly once over all
    processes, whatever the split size.
    """
    batch = local_batch_size(global_batch, process_count)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.map(functools.partial(_eval_example, preprocessing=eval_preprocessing(dataset)))
    ds = ds.batch(batch, drop_remainder=False)
    options = grain.ReadOptions(num_threads=dataset.num_threads, prefetch_buffer_size=dataset.prefetch * batch)
    count = 0
    shape = None
    for item in ds.to_iter_dataset(options):
        shape = item["image"].shape[1:]
        yield _pad(item, batch)
        count += 1
    shape = shape or (dataset.image_size, dataset.image_size, dataset.channels)
    for _ in range(count, num_eval_batches(len(source), global_batch, process_count)):
        yield {"image": np.zeros((batch, *shape), np.uint8), "label": np.zeros(batch, np.int32),
               "mask": np.zeros(batch, bool)}


def _pad(item: dict, batch: int) -> dict:
    real = len(item["label"])
    mask = np.arange(batch) < real
    padded = {key: np.concatenate([value, np.zeros((batch - real, *value.shape[1:]), value.dtype)])
              for key, value in item.items()}
    return {**padded, "mask": mask}
