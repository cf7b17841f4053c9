"""The locations FCOS predicts at: one point per cell of each pyramid level, at the cell's centre."""

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

# FCOS's object-size boundaries between the levels P3..P7 (the largest ltrb distance of a box
# from a point, in input pixels): P3 takes (0, 64], P4 (64, 128], ..., P7 (512, inf).
FCOS_SIZE_BOUNDARIES = (64.0, 128.0, 256.0, 512.0)


def level_shapes(image_size: tuple[int, int], strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(height, width) of each level for an input (H, W): ceil(H / stride) (PyTorch-style padded
    stride-2 layers round up)."""
    return tuple((-(-image_size[0] // s), -(-image_size[1] // s)) for s in strides)


def points(shapes: Sequence[tuple[int, int]], strides: Sequence[int],
           size_boundaries: Sequence[float] = FCOS_SIZE_BOUNDARIES) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """All points of the levels, level after level, row-major within a level.

    Returns:
      (points (N, 2) (x, y) in input pixels, strides (N,), size_ranges (N, 2): the (low, high]
      range of the largest regression distance a point of that level is responsible for).
    """
    if len(size_boundaries) != len(strides) - 1:
        raise ValueError(f"points: {len(strides)} levels need {len(strides) - 1} size boundaries; "
                         f"got {tuple(size_boundaries)}.")
    edges = (0.0, *size_boundaries, np.inf)
    all_points, all_strides, all_ranges = [], [], []
    for (height, width), stride, low, high in zip(shapes, strides, edges[:-1], edges[1:]):
        ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        xy = (np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) + 0.5) * stride
        all_points.append(xy)
        all_strides.append(np.full(len(xy), stride, np.float32))
        all_ranges.append(np.tile(np.asarray([[low, high]], np.float32), (len(xy), 1)))
    return (jnp.asarray(np.concatenate(all_points)), jnp.asarray(np.concatenate(all_strides)),
            jnp.asarray(np.concatenate(all_ranges)))
