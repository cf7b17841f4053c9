"""`cbam-jax predict --pretrained DIR IMAGE...`: the top-k classes of images, and the image loading
and eval preprocessing that `cbam-jax attention` shares.

The preprocessing is the one the weights were trained with, read from the model's saved metadata
(`"preprocessing": {"resize", "crop", "mean", "std"}`), never guessed: resize the short side to
`resize` (bilinear, as torchvision's `Resize` on PIL images), center-crop `crop` x `crop` (as
torchvision's `CenterCrop`), scale to [0, 1], subtract `mean` and divide by `std` per channel.
"""

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_TOP_K = 5
# Transparent pixels are shown over white, as an image viewer shows them.
ALPHA_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class InputError(Exception):
    """A user input (image file, model directory, option) that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing of a model: short side -> `resize`, center crop `crop`, (x/255 - mean) / std.

    `resize` or `crop` None skips that step; `mean` and `std` are per RGB channel on the [0, 1] scale.
    """

    resize: int | None
    crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "preprocessing") -> "Preprocessing":
        """Validate a metadata dict {"resize", "crop", "mean", "std"}; InputError names what is wrong."""
        missing = sorted({"resize", "crop", "mean", "std"} - set(values))
        if missing:
            raise InputError(f"{source} lacks {missing}; it needs resize, crop, mean and std.")
        sizes = {}
        for key in ("resize", "crop"):
            value = values[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{source}: {key} must be a positive integer or null; got {value!r}.")
            sizes[key] = value
        stats = {}
        for key in ("mean", "std"):
            value = values[key]
            if (not isinstance(value, Sequence) or len(value) != 3
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
                raise InputError(f"{source}: {key} must be three numbers (R, G, B on the [0, 1] scale); got {value!r}.")
            stats[key] = tuple(float(v) for v in value)
        if min(stats["std"]) <= 0:
            raise InputError(f"{source}: std must be positive; got {stats['std']}.")
        return cls(**sizes, **stats)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A pretrained model with what inference needs from its metadata."""

    model: nn.Module
    variables: Any
    class_names: list[str]
    preprocessing: Preprocessing


def load_image(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG (any mode: greyscale, 16-bit, palette, RGBA, CMYK) as RGB uint8 (H, W, 3).

    EXIF orientation is applied; transparent pixels are composited over white.

    Raises:
      InputError: the file is missing, is a directory, or is not a readable image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image file.")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so a truncated file fails here and not later
            image = ImageOps.exif_transpose(image)
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read (expected JPEG, PNG or another common format).") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise InputError(f"{path}: the image cannot be decoded ({error}); is the file truncated or corrupt?") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit greyscale: scale to 8 bits instead of clipping at 255
        grey = np.asarray(image, dtype=np.float64)
        grey = np.round(grey * (255.0 / 65535.0) if grey.max() > 255 else grey)
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode == "F":
        raise InputError("floating-point images are not supported; save the image as 8- or 16-bit PNG.")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def resize_and_crop(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """The geometric part of the preprocessing: RGB uint8 (H, W, 3) -> uint8 (crop, crop, 3).

    Short side to `resize` keeping the aspect ratio (long side truncated, as torchvision), then the
    centred `crop` x `crop` window (zero-padded where the image is smaller, as torchvision).
    """
    pil = Image.fromarray(image)
    if preprocessing.resize is not None:
        width, height = pil.size
        short, long = sorted((width, height))
        new_long = int(preprocessing.resize * long / short)
        size = (preprocessing.resize, new_long) if width <= height else (new_long, preprocessing.resize)
        if size != pil.size:
            pil = pil.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(pil)
    if preprocessing.crop is None:
        return array
    crop = preprocessing.crop
    pad_h, pad_w = max(crop - array.shape[0], 0), max(crop - array.shape[1], 0)
    if pad_h or pad_w:
        array = np.pad(array, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    top = int(round((array.shape[0] - crop) / 2.0))
    left = int(round((array.shape[1] - crop) / 2.0))
    return array[top:top + crop, left:left + crop]


def normalize(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> float32 (H, W, 3): (x / 255 - mean) / std."""
    mean = np.asarray(preprocessing.mean, np.float32)
    std = np.asarray(preprocessing.std, np.float32)
    return (image.astype(np.float32) / 255.0 - mean) / std


def preprocess(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """The full eval preprocessing: RGB uint8 (H, W, 3) -> float32 model input (crop, crop, 3)."""
    return normalize(resize_and_crop(image, preprocessing), preprocessing)


def load_model(path: str | Path, preprocessing_overrides: Mapping[str, Any] | None = None) -> LoadedModel:
    """Load a `save_pretrained` directory (e.g. written by `cbam-jax convert`) and its metadata.

    `preprocessing_overrides` (keys of `Preprocessing`, None values ignored) replace or supply the
    saved preprocessing.

    Raises:
      InputError: the directory is missing or holds no model, or the preprocessing is incomplete.
    """
    from cbam_jax.pretrained import load_metadata, load_pretrained  # the checkpoint stack, only when used

    path = Path(path)
    if not path.is_dir():
        raise InputError(f"--pretrained {path}: no such directory. Pass a directory written by "
                         "`cbam-jax convert` or `cbam_jax.save_pretrained`.")
    try:
        model, variables = load_pretrained(path)
        metadata = load_metadata(path) or {}
    except Exception as error:  # any failure here means the same thing to the user: no usable model
        raise InputError(f"--pretrained {path}: no cbam-jax model could be loaded from this directory "
                         f"({type(error).__name__}: {error}). Pass a directory written by `cbam-jax convert` "
                         "or `cbam_jax.save_pretrained`.") from error
    num_classes = getattr(model, "num_classes", 0)
    if num_classes < 1:
        raise InputError(f"--pretrained {path}: the model has no classification head (num_classes=0); "
                         "predict and attention need class scores.")
    saved = dict(metadata.get("preprocessing") or {})
    saved.update({k: v for k, v in (preprocessing_overrides or {}).items() if v is not None})
    if not saved:
        raise InputError(f"--pretrained {path}: the model's metadata records no preprocessing; give it with "
                         "--resize, --crop, --mean and --std (ImageNet weights: --resize 256 --crop 224 "
                         "--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225).")
    preprocessing = Preprocessing.from_dict(saved, source=f"{path} preprocessing (metadata and options)")
    names = list(metadata.get("class_names") or [])
    if len(names) != num_classes:  # absent or inconsistent: number the classes
        names = [f"class {i}" for i in range(num_classes)]
    return LoadedModel(model, variables, names, preprocessing)


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    return jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)


def top_k(model: nn.Module, variables: Any, images: np.ndarray, k: int = DEFAULT_TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most probable classes of preprocessed images (B, H, W, 3).

    Returns:
      (probabilities (B, k), class indices (B, k)), most probable first.
    """
    probabilities = np.asarray(_probabilities(model, variables, images))
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(probabilities, order, axis=-1), order


def same_shape_batches(items: Sequence[tuple[str, np.ndarray]], batch_size: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    """Consecutive runs of at most `batch_size` (name, array) items whose arrays share one shape."""
    batch: list[tuple[str, np.ndarray]] = []
    for item in items:
        if batch and (len(batch) == batch_size or item[1].shape != batch[0][1].shape):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> None:
    """--resize/--crop/--mean/--std: override or supply the preprocessing saved with the model."""
    group = parser.add_argument_group("preprocessing (default: as saved with the model)")
    group.add_argument("--resize", type=int, help="short side after resizing")
    group.add_argument("--crop", type=int, help="side of the center crop")
    group.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="channel means on the [0, 1] scale")
    group.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="channel stds on the [0, 1] scale")


def preprocessing_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"resize": args.resize, "crop": args.crop, "mean": args.mean, "std": args.std}


def load_images(paths: Sequence[str], preprocessing: Preprocessing) -> tuple[list[tuple[str, np.ndarray]], int]:
    """Load and crop each image (uint8); an unusable one is reported on stderr and skipped.

    Returns:
      ([(path, cropped uint8 image)], number of failures).
    """
    loaded, failures = [], 0
    for path in paths:
        try:
            loaded.append((path, resize_and_crop(load_image(path), preprocessing)))
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            failures += 1
    return loaded, failures


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--pretrained", required=True, metavar="DIR",
                        help="a model directory written by `cbam-jax convert` or save_pretrained")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="classes to print per image (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (%(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    add_preprocessing_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Print the top-k classes of every readable image; exit 1 if any image failed, 2 without a model."""
    if args.top_k < 1 or args.batch_size < 1:
        print("error: --top-k and --batch-size must be positive.", file=sys.stderr)
        return 2
    try:
        loaded_model = load_model(args.pretrained, preprocessing_overrides(args))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    items, failures = load_images(args.images, loaded_model.preprocessing)
    k = min(args.top_k, len(loaded_model.class_names))
    for batch in same_shape_batches(items, args.batch_size):
        inputs = np.stack([normalize(image, loaded_model.preprocessing) for _, image in batch])
        probabilities, indices = top_k(loaded_model.model, loaded_model.variables, inputs, k)
        for (path, _), probs, classes in zip(batch, probabilities, indices):
            ranked = [{"index": int(c), "class": loaded_model.class_names[c], "probability": float(p)}
                      for p, c in zip(probs, classes)]
            if args.json:
                print(json.dumps({"image": path, "top_k": ranked}))
            else:
                print(path)
                for rank, entry in enumerate(ranked, 1):
                    print(f"  {rank}. {entry['probability']:.4f}  {entry['class']} ({entry['index']})")
    if failures:
        print(f"{failures} of {len(args.images)} image(s) could not be read (see the errors above).", file=sys.stderr)
    return 1 if failures else 0
