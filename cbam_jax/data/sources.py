"""Random-access sources of examples `{'image': uint8 (H, W, C), 'label': int}` for grain.

- `ArraySource`: arrays in memory (the embedded digits).
- `tfds_source`: `tfds.data_source` over prepared ArrayRecord files (no TensorFlow needed to read).
- `ImageFolderSource`: `root/CLASS/*.png|jpg|...`, classes (those of the training split) by folder name.
"""

import os
import warnings

import numpy as np

from cbam_jax.errors import InvalidInput, MissingInput, require
from cbam_jax.images import InputError, ensure_channels, load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
DIGITS_TEST_FRACTION = 0.2


class ArraySource:
    """Examples from in-memory arrays: images (N, H, W, C) uint8 and labels (N,)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or images.dtype != np.uint8 or len(images) != len(labels):
            raise ValueError(f"ArraySource needs uint8 images (N, H, W, C) and N labels; got {images.dtype} "
                             f"{images.shape} and {np.shape(labels)}.")
        self.images, self.labels = images, np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "label": int(self.labels[index])}


def digits_source(split: str) -> ArraySource:
    """scikit-learn's 1,797 real 8x8 grey digits (0..16 scaled to uint8), a fixed 80/20 split.

    The split is stratified by class and never changes (seed 0): 'train' has 1,438 images, 'test' 359.
    """
    if split not in ("train", "test"):
        raise InvalidInput(f"The digits dataset has splits 'train' and 'test'; got {split!r}.")
    digits = require("sklearn.datasets", "train").load_digits()  # the embedded digits ship with scikit-learn
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        test[members[:int(round(len(members) * DIGITS_TEST_FRACTION))]] = True
    chosen = test if split == "test" else ~test
    return ArraySource(images[chosen], labels[chosen])


def tfds_source(name: str, split: str, data_dir: str | None = None):
    """`tfds.data_source(name, split)` over ArrayRecord files; a clear error when not prepared."""
    tfds = require("tensorflow_datasets", "train")
    from absl import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # tfds warns about a missing prepared folder before raising
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as error:  # tfds raises several types for "not prepared" (AssertionError, DatasetNotFound...)
        where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
        raise MissingInput(
            f"Could not open tfds dataset {name!r} split {split!r} in {where}: {error}\n"
            f"Prepare it once (needs TensorFlow: pip install 'cbam-jax[prepare]'):\n"
            f"  python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir={data_dir or None!r})"
            f".download_and_prepare(file_format='array_record')\"\n"
            "ImageNet needs its archives in <data_dir>/downloads/manual first (see configs/imagenet2012.py)."
        ) from error
    finally:
        logging.set_verbosity(verbosity)


def class_folders(root: str) -> list[str]:
    """The class names of an image folder: its sub-folders, sorted by name."""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


class ImageFolderSource:
    """Images in `root/CLASS_NAME/...` (any depth below the class folder); label = index of the class name.

    `classes`: the class names in label order, those of the training split, so that every split is
    mapped by name (default: this folder's own sub-folders, sorted). A folder naming a class outside
    `classes` is refused; classes this split lacks are warned about in one line (labels stay right).
    Images are read as `cbam-jax predict` reads them (`cbam_jax.images.load_image`: EXIF orientation
    applied, transparency over white, 16-bit scaled to 8), then converted to `channels`. Files without
    an image extension are ignored. An unreadable image raises a ValueError naming the file when it is
    read; with `verify=True` every image is decoded once up front and unreadable ones are skipped with
    a warning instead.
    """

    def __init__(self, root: str, channels: int = 3, verify: bool = False, classes: list[str] | None = None):
        if not os.path.isdir(root):
            raise MissingInput(f"Image folder {root!r} does not exist; expected {root}/CLASS_NAME/image.jpg.")
        present = class_folders(root)
        if not present:
            raise InvalidInput(f"Image folder {root!r} has no class sub-folders; expected {root}/CLASS_NAME/image.jpg.")
        self.classes = list(classes) if classes is not None else present
        unknown = sorted(set(present) - set(self.classes))
        if unknown:
            raise InvalidInput(f"Image folder {root!r} has class folders the training split lacks ({', '.join(unknown[:3])}"
                               f"{', ...' if len(unknown) > 3 else ''}); every split needs the training split's class "
                               "names. Rename or remove them.")
        missing = sorted(set(self.classes) - set(present))
        if missing:
            warnings.warn(f"Image folder {root!r} lacks {len(missing)} of the {len(self.classes)} classes of the training "
                          f"split ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the others keep "
                          "their labels.", stacklevel=2)
        if channels not in (1, 3):
            raise ValueError(f"ImageFolderSource: channels must be 1 (greyscale) or 3 (RGB); got {channels!r}.")
        self.channels = channels
        self.files: list[tuple[str, int]] = []
        for name in present:
            label = self.classes.index(name)
            for folder, _, names in sorted(os.walk(os.path.join(root, name))):
                self.files.extend((os.path.join(folder, f), label) for f in sorted(names)
                                  if f.lower().endswith(IMAGE_EXTENSIONS))
        if verify:
            readable = []
            for path, label in self.files:
                try:
                    load_image(path)
                    readable.append((path, label))
                except InputError as error:
                    warnings.warn(f"Skipping unreadable image {error}")
            self.files = readable
        if not self.files:
            raise InvalidInput(f"Image folder {root!r} has no images with extensions {IMAGE_EXTENSIONS}.")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, label = self.files[index]
        try:
            image = load_image(path)
        except InputError as error:
            raise InvalidInput(f"Cannot read image {error} Remove or replace it, or set "
                             "config.dataset.verify_images=True to skip unreadable files with a warning.") from error
        return {"image": ensure_channels(image, self.channels), "label": label}
