"""Boxes (x0, y0, x1, y1) in pixels: area, IoU, GIoU, and FCOS's box coding (distances from a point
to the four sides, in units of the level's stride)."""

import jax
import jax.numpy as jnp


def area(boxes: jax.Array) -> jax.Array:
    """(..., 4) -> (...); degenerate boxes (x1 < x0 or y1 < y0) have area 0."""
    return jnp.clip(boxes[..., 2] - boxes[..., 0], 0) * jnp.clip(boxes[..., 3] - boxes[..., 1], 0)


def _intersection_and_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    top_left = jnp.maximum(a[..., :2], b[..., :2])
    bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
    intersection = jnp.prod(jnp.clip(bottom_right - top_left, 0), axis=-1)
    return intersection, area(a) + area(b) - intersection


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Elementwise IoU of broadcastable (..., 4) boxes; 0 where the union is empty."""
    intersection, union = _intersection_and_union(a, b)
    return jnp.where(union > 0, intersection / jnp.where(union > 0, union, 1.0), 0.0)


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """(N, 4), (M, 4) -> (N, M) IoU matrix."""
    return iou(a[:, None, :], b[None, :, :])


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Generalised IoU (Rezatofighi et al. 2019) of broadcastable (..., 4) boxes, in (-1, 1]:
    IoU - (enclosing area - union) / enclosing area (0 where the enclosing box is empty)."""
    intersection, union = _intersection_and_union(a, b)
    iou_value = jnp.where(union > 0, intersection / jnp.where(union > 0, union, 1.0), 0.0)
    enclosing = area(jnp.concatenate([jnp.minimum(a[..., :2], b[..., :2]), jnp.maximum(a[..., 2:], b[..., 2:])], -1))
    return iou_value - jnp.where(enclosing > 0, (enclosing - union) / jnp.where(enclosing > 0, enclosing, 1.0), 0.0)


def encode(points: jax.Array, boxes: jax.Array, strides: jax.Array) -> jax.Array:
    """FCOS regression targets: (left, top, right, bottom) distances from `points` (..., 2) (x, y) to
    the sides of `boxes` (..., 4), divided by `strides` (...) -> (..., 4)."""
    distances = jnp.concatenate([points - boxes[..., :2], boxes[..., 2:] - points], axis=-1)
    return distances / strides[..., None]


def decode(points: jax.Array, distances: jax.Array, strides: jax.Array) -> jax.Array:
    """The inverse of `encode`: (..., 2) points, (..., 4) ltrb distances in strides -> (..., 4) boxes."""
    distances = distances * strides[..., None]
    return jnp.concatenate([points - distances[..., :2], points + distances[..., 2:]], axis=-1)


def centerness(distances: jax.Array) -> jax.Array:
    """FCOS's centerness target sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of (..., 4) ltrb
    distances; 0 where a distance is <= 0 (the point is outside its box)."""
    left_right, top_bottom = distances[..., 0::2], distances[..., 1::2]
    ratio = (jnp.min(left_right, -1) / jnp.maximum(jnp.max(left_right, -1), 1e-12)
             * jnp.min(top_bottom, -1) / jnp.maximum(jnp.max(top_bottom, -1), 1e-12))
    return jnp.sqrt(jnp.clip(ratio, 0.0)) * (jnp.min(distances, -1) > 0)
