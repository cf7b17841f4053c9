"""Detection examples: the generated shapes set (offline), tfds VOC 2007 / COCO 2017, the checks on
ground truth, augmentation (flip, resize) and deterministic, resumable batches.

An example is {'image': uint8 (H, W, 3), 'boxes': float32 (n, 4) (x0, y0, x1, y1) pixels,
'labels': int32 (n,)}; a batch pads the boxes to `max_boxes` with a mask:
{'image': uint8 (B, S, S, 3), 'boxes': (B, M, 4), 'labels': (B, M), 'mask': bool (B, M),
'scale': float32 (B,) (input pixels per original pixel), 'index': int (B,)}.

What the checks do with imperfect ground truth (documented in docs/detection.md):
- an image without boxes is a valid example (all its points are background);
- boxes reaching outside the image are clipped to it; boxes that are empty after clipping
  (degenerate: width or height < `MIN_BOX_SIZE` pixels) are dropped;
- a class id outside [0, num_classes), a non-finite coordinate, or more than `max_boxes` boxes in
  one image is an error naming the example and the fix.
"""

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cbam_jax.atomic import atomic_output
from cbam_jax.errors import InvalidInput, UsageError, UserError, describe_os_error, report
from cbam_jax.images import resize

SHAPE_CLASSES = ("rectangle", "ellipse", "triangle")
MIN_BOX_SIZE = 1.0  # pixels: narrower boxes carry no point to train on and are dropped


# ---- the generated set -------------------------------------------------------------------------

class ShapesDataset:
    """Images of coloured rectangles, ellipses and triangles on a noisy background, with their boxes.

    Example i of a split is a function of (seed, split, i) alone: the same on every machine and in
    any order. 'train' and 'test' draw from different streams.

    Attributes:
      num_images: examples in the split; image_size: side of the square images;
      min_objects, max_objects: objects per image (0 allowed: images without boxes);
      min_size, max_size: object side in pixels.
    """

    class_names = SHAPE_CLASSES

    def __init__(self, num_images: int, image_size: int = 64, *, seed: int = 0, split: str = "train",
                 min_objects: int = 1, max_objects: int = 4, min_size: int = 10, max_size: int = 32):
        if split not in ("train", "test"):
            raise InvalidInput(f"ShapesDataset: split must be 'train' or 'test'; got {split!r}.")
        if not 0 <= min_objects <= max_objects or not 2 <= min_size <= max_size <= image_size:
            raise InvalidInput(f"ShapesDataset: need 0 <= min_objects <= max_objects and 2 <= min_size <= max_size "
                               f"<= image_size; got objects {min_objects}..{max_objects}, sizes {min_size}..{max_size}, "
                               f"image_size {image_size}.")
        self.num_images, self.image_size, self.seed, self.split = num_images, image_size, seed, split
        self.min_objects, self.max_objects, self.min_size, self.max_size = min_objects, max_objects, min_size, max_size

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, ("train", "test").index(self.split), index])
        size = self.image_size
        background = rng.uniform(0, 80, 3)
        image = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255)
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        boxes, labels = [], []
        for _ in range(rng.integers(self.min_objects, self.max_objects + 1)):
            for _attempt in range(10):  # place without heavy overlap, so that every object stays visible
                w, h = rng.integers(self.min_size, self.max_size + 1, 2)
                x0, y0 = rng.integers(0, size - w + 1), rng.integers(0, size - h + 1)
                box = np.asarray([x0, y0, x0 + w, y0 + h], np.float32)
                if all(_iou(box, other) < 0.2 for other in boxes):
                    break
            else:
                continue
            label = int(rng.integers(len(SHAPE_CLASSES)))
            u, v = (xs - x0) / w, (ys - y0) / h  # [0, 1] inside the box
            inside = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
            if label == 1:
                inside &= (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
            elif label == 2:  # apex at the top centre, base along the bottom
                inside &= np.abs(u - 0.5) <= v / 2
            image[inside] = rng.uniform(120, 255, 3)
            boxes.append(box)
            labels.append(label)
        return {"image": image.astype(np.uint8), "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "labels": np.asarray(labels, np.int32)}


def write_shapes_images(folder: str | os.PathLike, count: int = 8, *, seed: int = 0, image_size: int = 64) -> list[Path]:
    """Write the first `count` held-out ('test' split) images of the generated set as PNG files
    `shapes_{i}.png` into `folder` (created if needed): images to try `cbam-jax detect` on."""
    if count < 1:
        raise InvalidInput(f"count must be >= 1; got {count}.")
    dataset = ShapesDataset(count, image_size, seed=seed, split="test")
    paths = []
    for index in range(count):
        path = Path(folder) / f"shapes_{index}.png"
        with atomic_output(path, replace=True) as temporary:
            Image.fromarray(dataset[index]["image"]).save(temporary, format="PNG")
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cbam_jax.detection.data FOLDER [COUNT]`: write images of the generated set."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2 or not (len(args) == 1 or args[1].isdigit()):
        return report("cbam_jax.detection.data", UsageError("usage: python -m cbam_jax.detection.data FOLDER [COUNT]"))
    try:
        paths = write_shapes_images(args[0], int(args[1]) if len(args) == 2 else 8)
    except (UserError, OSError) as error:
        return report("cbam_jax.detection.data", error if isinstance(error, UserError) else describe_os_error(error))
    print(f"wrote {len(paths)} images to {args[0]}")
    return 0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


# ---- tfds --------------------------------------------------------------------------------------

class TfdsDetectionSource:
    """VOC 2007 ('voc/2007') or COCO 2017 ('coco/2017') from `tfds.data_source`, as detection examples.

    tfds stores boxes as normalised (ymin, xmin, ymax, xmax); they become pixels (x0, y0, x1, y1).
    COCO's crowd regions (`is_crowd`) and VOC's `is_difficult` objects are left out of training
    examples, as the papers' training does.
    """

    def __init__(self, records: Sequence[dict]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = np.asarray(record["image"], np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, -1)
        height, width = image.shape[:2]
        objects = record["objects"]
        bbox = np.asarray(objects["bbox"], np.float32).reshape(-1, 4)
        keep = np.ones(len(bbox), bool)
        for flag in ("is_crowd", "is_difficult"):
            if flag in objects:
                keep &= ~np.asarray(objects[flag], bool).reshape(-1)
        boxes = bbox[:, [1, 0, 3, 2]] * np.asarray([width, height, width, height], np.float32)
        return {"image": image, "boxes": boxes[keep], "labels": np.asarray(objects["label"], np.int32).reshape(-1)[keep]}


# ---- checks on ground truth --------------------------------------------------------------------

def check_example(example: dict, num_classes: int, max_boxes: int, origin: str) -> dict:
    """The example with its boxes clipped to the image and degenerate ones dropped (see the module
    docstring); InvalidInput naming `origin` for a class id out of range, a non-finite coordinate,
    a malformed box array or too many boxes."""
    image = example["image"]
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InvalidInput(f"{origin}: the image must be uint8 (H, W, 3); got {image.dtype} {image.shape}.")
    boxes = np.asarray(example["boxes"], np.float32)
    labels = np.asarray(example["labels"])
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != (len(boxes),):
        raise InvalidInput(f"{origin}: boxes must be (n, 4) with n labels; got {boxes.shape} and {labels.shape}.")
    if not np.all(np.isfinite(boxes)):
        raise InvalidInput(f"{origin}: a box has a non-finite coordinate ({boxes[~np.isfinite(boxes).all(1)][0]}).")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise InvalidInput(f"{origin}: class id {int(bad[0])} is outside 0..{num_classes - 1}; set "
                           f"config.dataset.num_classes to the number of classes of the data.")
    height, width = image.shape[:2]
    boxes = np.clip(boxes, 0, np.asarray([width, height, width, height], np.float32))
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIZE)
    if keep.sum() > max_boxes:
        raise InvalidInput(f"{origin}: {int(keep.sum())} boxes, more than config.detection.max_boxes = {max_boxes}; "
                           "raise it.")
    return {**example, "boxes": boxes[keep], "labels": labels[keep].astype(np.int32)}


# ---- augmentation ------------------------------------------------------------------------------

def flip(example: dict) -> dict:
    """Mirror left-right: x -> W - x on the image and the boxes."""
    width = example["image"].shape[1]
    boxes = example["boxes"].copy()
    boxes[:, [0, 2]] = width - example["boxes"][:, [2, 0]]
    return {**example, "image": example["image"][:, ::-1], "boxes": boxes}


def resize_to_canvas(example: dict, scale: float, size: int) -> dict:
    """Resize the image by `scale` (boxes too) and place it at the top-left of a black size x size canvas
    (cropped where larger); boxes are clipped to the canvas and degenerate ones dropped. Adds 'scale':
    canvas pixels per original pixel (exact for the rounded image size on each axis: x and y the same
    up to rounding; the x factor is returned)."""
    image = example["image"]
    height, width = image.shape[:2]
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    resized = resize(image, new_h, new_w)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:min(size, new_h), :min(size, new_w)] = resized[:size, :size]
    factors = np.asarray([new_w / width, new_h / height] * 2, np.float32)
    boxes = np.clip(example["boxes"] * factors, 0, size)
    keep = ((boxes[:, 2] - boxes[:, 0]) >= MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) >= MIN_BOX_SIZE)
    return {**example, "image": canvas, "boxes": boxes[keep], "labels": example["labels"][keep],
            "scale": float(factors[0])}


def fit_scale(example: dict, size: int) -> float:
    """The scale that fits the longer side of the image to `size` (the eval resize)."""
    return size / max(example["image"].shape[:2])


def augment(example: dict, rng: np.random.Generator, size: int, flip_probability: float,
            scale_range: tuple[float, float]) -> dict:
    """Training augmentation: a random flip, then a random resize (times the fit to `size`, uniform in
    `scale_range`) onto the size x size canvas."""
    if rng.uniform() < flip_probability:
        example = flip(example)
    scale = fit_scale(example, size) * rng.uniform(*scale_range)
    return resize_to_canvas(example, scale, size)


# ---- batches -----------------------------------------------------------------------------------

def pad_boxes(example: dict, max_boxes: int) -> dict:
    """Boxes (max_boxes, 4), labels (max_boxes,), mask (max_boxes,) from an example's n boxes."""
    n = len(example["boxes"])
    boxes = np.zeros((max_boxes, 4), np.float32)
    labels = np.zeros(max_boxes, np.int32)
    boxes[:n], labels[:n] = example["boxes"], example["labels"]
    return {"image": example["image"], "boxes": boxes, "labels": labels, "mask": np.arange(max_boxes) < n,
            "scale": np.float32(example.get("scale", 1.0))}


def load_example(source, index: int, *, num_classes: int, max_boxes: int, size: int, train: bool, seed: int,
                 epoch: int = 0, flip_probability: float = 0.5, scale_range: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Example `index` checked, augmented (train, with a generator of (seed, epoch, index)) or fitted
    to the canvas (eval), and padded."""
    example = check_example(source[index], num_classes, max_boxes, f"example {index}")
    if train:
        rng = np.random.default_rng([seed, epoch, index])
        example = augment(example, rng, size, flip_probability, scale_range)
    else:
        example = resize_to_canvas(example, fit_scale(example, size), size)
    return {**pad_boxes(example, max_boxes), "index": np.int64(index)}


def stack(examples: list[dict]) -> dict:
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


class TrainBatches:
    """An endless stream of training batches; batch s depends on (seed, s) alone, so `get_state` /
    `set_state` (the next batch number, JSON) resume it exactly. Each epoch is a new permutation;
    the last incomplete batch of an epoch is dropped."""

    def __init__(self, source, batch_size: int, *, seed: int, **example_options):
        self.source, self.batch_size, self.seed, self.options = source, batch_size, seed, example_options
        self.per_epoch = len(source) // batch_size
        if self.per_epoch == 0:
            raise InvalidInput(f"config.batch_size = {batch_size} exceeds the {len(source)} training examples.")
        self.next_batch = 0

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        epoch, position = divmod(self.next_batch, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
        chosen = order[position * self.batch_size:(position + 1) * self.batch_size]
        self.next_batch += 1
        return stack([load_example(self.source, int(i), train=True, seed=self.seed, epoch=epoch, **self.options)
                      for i in chosen])

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch}

    def set_state(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])


def eval_batches(source, batch_size: int, **example_options) -> Iterator[dict]:
    """The whole split in order, in batches of `batch_size` (the last one padded by repeating example 0,
    marked by 'valid' False)."""
    for start in range(0, len(source), batch_size):
        indices = list(range(start, min(start + batch_size, len(source))))
        valid = [True] * len(indices) + [False] * (batch_size - len(indices))
        indices += [0] * (batch_size - len(indices))
        batch = stack([load_example(source, i, train=False, seed=0, **example_options) for i in indices])
        batch["valid"] = np.asarray(valid)
        yield batch


if __name__ == "__main__":
    sys.exit(main())
