"""Per-example image transforms on uint8 NHWC-style arrays (H, W, C); normalisation happens on device.

Training: `pad_crop` (CIFAR: zero-pad then a random crop) and `random_resized_crop` (ImageNet: a
random area 8-100% and aspect 3/4-4/3, resized), each optionally with a horizontal flip.
Evaluation: `resize_center_crop` (resize the shorter side, then a center crop).
"""

import math

import numpy as np
from PIL import Image


def ensure_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 1|3) -> (H, W, channels): grey is repeated to RGB, RGB is converted to grey."""
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


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (antialiased, as PIL does) of a uint8 (H, W, C) image to (height, width, C)."""
    if image.shape[:2] == (height, width):
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out.reshape(height, width, channels)


def pad_crop(image: np.ndarray, rng: np.random.Generator, size: int, padding: int) -> np.ndarray:
    """Zero-pad by `padding` on each side, then crop a random size x size window."""
    image = resize(image, size, size)
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    return padded[top:top + size, left:left + size]


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """Inception-style crop: a random window of `scale` of the area and `ratio` aspect, resized to size x size.

    After 10 failed tries (windows larger than the image) it falls back to the largest center crop
    whose aspect lies within `ratio`.
    """
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return resize(image[top:top + h, left:left + w], size, size)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    top, left = (height - h) // 2, (width - w) // 2
    return resize(image[top:top + h, left:left + w], size, size)


def resize_center_crop(image: np.ndarray, size: int, resize_to: int) -> np.ndarray:
    """Resize the shorter side to `resize_to` (keeping the aspect), then a center size x size crop.

    `resize_to == 0` resizes the whole image to size x size instead.
    """
    if resize_to <= 0:
        return resize(image, size, size)
    # torchvision's rounding (long side truncated, crop offset rounded), as `cbam-jax predict` does.
    height, width = image.shape[:2]
    short = min(height, width)
    new_h, new_w = max(size, int(resize_to * height / short)), max(size, int(resize_to * width / short))
    image = resize(image, new_h, new_w)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image[top:top + size, left:left + size]


def maybe_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image
