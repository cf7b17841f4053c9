"""Random training augmentations of uint8 (H, W, C) images; normalisation happens on device.

`pad_crop` (CIFAR: zero-pad then a random crop) and `random_resized_crop` (ImageNet: a random area
8-100% and aspect 3/4-4/3, resized), each optionally with a horizontal flip (`maybe_flip`). The
eval geometry (resize, center crop) is `cbam_jax.images.resize_and_crop`, shared with `cbam-jax predict`.
"""

import math

import numpy as np

from cbam_jax.images import resize


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


def maybe_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image
