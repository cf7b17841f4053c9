"""Images from files to model inputs: the one place for loading, eval geometry and normalisation.

Shared by `cbam-jax predict`, `cbam-jax attention`, the data pipeline (the image-folder source and
the eval transform) and the training step (`normalize` runs on the device there), so that
inference outside training sees exactly the inputs the model was trained and evaluated on.

An eval preprocessing (`Preprocessing`, as saved in a pretrained model's metadata
`"preprocessing": {"resize", "crop", "mean", "std"[, "channels"]}`): convert to `channels` (3: RGB,
the default; 1: greyscale 'L'), resize the short side to `resize` (bilinear, as torchvision's
`Resize` on PIL images; a [height, width] pair resizes to exactly that size), center-crop `crop` x
`crop` (as torchvision's `CenterCrop`, zero-padded where the image is smaller), scale to [0, 1],
subtract `mean` and divide by `std` per channel (one value per channel).
"""

import dataclasses
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cbam_jax.errors import InvalidInput, report

# Larger images are refused before they are decoded: a small file whose header claims a huge size
# (a "decompression bomb") would otherwise take gigabytes. 100 megapixels is e.g. 12000 x 8000.
MAX_IMAGE_PIXELS = 100_000_000
# Transparent pixels are shown over white, as an image viewer shows them.
ALPHA_BACKGROUND = (255, 255, 255)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class InputError(InvalidInput):
    """A user input (image file, model directory, option) that cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """Eval preprocessing of a model: `channels`, short side -> `resize` (or exactly (height, width)),
    center crop `crop`, (x/255 - mean) / std.

    `resize` or `crop` None skips that step; `mean` and `std` have one value per channel on the
    [0, 1] scale; `channels` is 3 (RGB) or 1 (greyscale).
    """

    resize: int | tuple[int, int] | None
    crop: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "preprocessing") -> "Preprocessing":
        """Validate a metadata dict {"resize", "crop", "mean", "std"[, "channels"]}; InputError names
        what is wrong."""
        missing = sorted({"resize", "crop", "mean", "std"} - set(values))
        if missing:
            raise InputError(f"{source} lacks {missing}; it needs resize, crop, mean and std.")
        channels = values.get("channels", 3)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise InputError(f"{source}: channels must be 1 (greyscale) or 3 (RGB); got {channels!r}.")
        resize, crop = values["resize"], values["crop"]
        if isinstance(resize, Sequence) and not isinstance(resize, str):
            if len(resize) != 2 or not all(_is_positive_int(v) for v in resize):
                raise InputError(f"{source}: resize must be a positive integer (short side), a pair [height, width] "
                                 f"of positive integers, or null; got {resize!r}.")
            resize = tuple(resize)
        elif resize is not None and not _is_positive_int(resize):
            raise InputError(f"{source}: resize must be a positive integer (short side), a pair [height, width] "
                             f"of positive integers, or null; got {resize!r}.")
        if crop is not None and not _is_positive_int(crop):
            raise InputError(f"{source}: crop must be a positive integer or null; got {crop!r}.")
        stats = {}
        for key in ("mean", "std"):
            value = values[key]
            if (not isinstance(value, Sequence) or len(value) != channels
                    or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):
                expected = "three numbers (R, G, B" if channels == 3 else "one number (grey"
                raise InputError(f"{source}: {key} must be {expected} on the [0, 1] scale; channels={channels}); "
                                 f"got {value!r}.")
            stats[key] = tuple(float(v) for v in value)
        if min(stats["std"]) <= 0:
            raise InputError(f"{source}: std must be positive; got {stats['std']}.")
        return cls(resize, crop, **stats, channels=channels)

    def to_dict(self) -> dict[str, Any]:
        """The metadata form (JSON types: lists, not tuples) that `from_dict` reads back."""
        return {"resize": list(self.resize) if isinstance(self.resize, tuple) else self.resize, "crop": self.crop,
                "mean": list(self.mean), "std": list(self.std), "channels": self.channels}


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---- loading ----------------------------------------------------------------------------------

def load_image(path: str | Path) -> np.ndarray:
    """Read a JPEG/PNG (any mode: greyscale, 16-bit, palette, RGBA, CMYK) as RGB uint8 (H, W, 3).

    EXIF orientation is applied; transparent pixels are composited over white; of an animated
    image (GIF, APNG, WebP) the first frame is read.

    Raises:
      InputError: the file is missing, is a directory, is not a readable image, is larger than
        MAX_IMAGE_PIXELS, or holds floating-point pixels; the message starts with the path.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an image file.")
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own limit and raises at twice it; ours is checked below, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{path}: the image is {width} x {height} pixels, more than the "
                                     f"{MAX_IMAGE_PIXELS:,} cbam-jax reads (cbam_jax.images.MAX_IMAGE_PIXELS); "
                                     "downscale it first.")
                image.load()  # decode now, so a truncated file fails here and not later
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image, path)
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image Pillow can read (expected JPEG, PNG or another common format).") from None
    except Image.DecompressionBombError as error:
        raise InputError(f"{path}: the image is too large to read ({error}).") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{path}: the image cannot be decoded ({error}); is the file truncated or corrupt?") from None


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode in SIXTEEN_BIT_MODES:  # 16-bit greyscale: scale by the bit depth, never by the values held
        grey = np.round(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0))
        return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if image.mode == "F":
        raise InputError(f"{path}: floating-point images are not supported; save the image as 8- or 16-bit PNG.")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_images(paths: Sequence[str], preprocessing: Preprocessing,
                program: str = "cbam-jax") -> tuple[list[tuple[str, np.ndarray]], int]:
    """Load, convert to the model's channels and crop each image (uint8); an unusable one is reported
    on stderr (one line, `program: error: PATH: why`) and skipped.

    Returns:
      ([(path, cropped uint8 image (crop, crop, channels))], number of failures).
    """
    loaded, failures = [], 0
    for path in paths:
        try:
            loaded.append((path, resize_and_crop(to_model_channels(load_image(path), preprocessing), preprocessing)))
        except InputError as error:
            report(program, error)
            failures += 1
    return loaded, failures


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


# ---- channels and geometry (uint8 (H, W, C) on the host) --------------------------------------

def ensure_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 1|3|4) -> (H, W, channels): grey is repeated to RGB, RGB becomes grey as
    Pillow's 'L' conversion makes it, an alpha channel is dropped."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == channels:
        return image
    if image.shape[-1] == 1 and channels == 3:
        return np.repeat(image, 3, axis=-1)
    if image.shape[-1] in (3, 4) and channels == 1:
        return np.asarray(Image.fromarray(image[..., :3]).convert("L"))[..., None]
    if image.shape[-1] == 4 and channels == 3:
        return image[..., :3]
    raise ValueError(f"Cannot convert an image with {image.shape[-1]} channels to {channels}.")


def to_model_channels(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> uint8 (H, W, channels) of the preprocessing."""
    return ensure_channels(image, preprocessing.channels)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (antialiased, as PIL does) of a uint8 (H, W, C) image to (height, width, C)."""
    if image.shape[:2] == (height, width):
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR)).reshape(height, width, channels)


def resize_and_crop(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """The geometric part of the preprocessing: uint8 (H, W, C) -> uint8 (crop, crop, C).

    Short side to `resize` keeping the aspect ratio (long side truncated, as torchvision), or to
    exactly `resize` = (height, width); then the centred `crop` x `crop` window (crop offset rounded,
    zero-padded where the image is smaller, as torchvision).
    """
    height, width = image.shape[:2]
    if isinstance(preprocessing.resize, tuple):
        image = resize(image, *preprocessing.resize)
    elif preprocessing.resize is not None:
        short = min(height, width)
        image = resize(image, int(preprocessing.resize * height / short), int(preprocessing.resize * width / short))
    if preprocessing.crop is None:
        return image
    crop = preprocessing.crop
    pad_h, pad_w = max(crop - image.shape[0], 0), max(crop - image.shape[1], 0)
    if pad_h or pad_w:
        image = np.pad(image, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    top = int(round((image.shape[0] - crop) / 2.0))
    left = int(round((image.shape[1] - crop) / 2.0))
    return image[top:top + crop, left:left + crop]


# ---- normalisation ----------------------------------------------------------------------------

def normalize(images: np.ndarray | jax.Array, mean: Sequence[float], std: Sequence[float]) -> np.ndarray | jax.Array:
    """uint8 (..., H, W, C) -> float32 ((x / 255) - mean) / std per channel.

    NumPy in, NumPy out (on the host, e.g. `cbam-jax predict`); a JAX array or tracer in, a JAX
    array out (inside the jitted train and eval steps, so batches travel to the device as uint8).
    """
    xp = np if isinstance(images, np.ndarray) else jnp
    x = images.astype(xp.float32) / 255.0
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def preprocess(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """The full eval preprocessing: RGB uint8 (H, W, 3) -> float32 model input (crop, crop, channels)."""
    image = resize_and_crop(to_model_channels(image, preprocessing), preprocessing)
    return normalize(image, preprocessing.mean, preprocessing.std)
