"""FCOS target assignment with static shapes: each point gets at most one ground-truth box.

A point is a candidate for a box when it lies inside the box (with `center_radius` > 0: inside the
box's central region of radius `center_radius * stride`, FCOS's "center sampling") and the box's
largest distance from the point falls into the point's level range. Of several candidate boxes
the one with the smallest area wins (FCOS); equal areas go to the lower box index.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cbam_jax.detection import boxes as box_lib

BACKGROUND = -1


class Targets(NamedTuple):
    """Per point (N): the class (-1 = background), the assigned box (N, 4) (zeros for background),
    the ltrb regression target in strides (N, 4) and the centerness target (N,)."""

    labels: jax.Array
    boxes: jax.Array
    distances: jax.Array
    centerness: jax.Array


def assign(points: jax.Array, strides: jax.Array, size_ranges: jax.Array, gt_boxes: jax.Array,
           gt_labels: jax.Array, gt_mask: jax.Array, center_radius: float = 1.5) -> Targets:
    """Targets of one image.

    Args:
      points: (N, 2) (x, y); strides: (N,); size_ranges: (N, 2) (low, high] (from `points.points`).
      gt_boxes: (M, 4) padded ground truth; gt_labels: (M,) class ids; gt_mask: (M,) True for real boxes.
      center_radius: 0 = the whole box; > 0 = FCOS center sampling in strides.
    """
    point = points[:, None, :]  # (N, 1, 2)
    box = gt_boxes[None, :, :]  # (1, M, 4)
    distances = jnp.concatenate([point - box[..., :2], box[..., 2:] - point], -1)  # (N, M, 4) pixels
    if center_radius > 0:
        centre = (box[..., :2] + box[..., 2:]) / 2
        radius = center_radius * strides[:, None, None]
        region = jnp.concatenate([jnp.maximum(centre - radius, box[..., :2]), jnp.minimum(centre + radius, box[..., 2:])], -1)
        inside = jnp.min(jnp.concatenate([point - region[..., :2], region[..., 2:] - point], -1), -1) > 0
    else:
        inside = jnp.min(distances, -1) > 0
    largest = jnp.max(distances, -1)
    in_range = (largest > size_ranges[:, None, 0]) & (largest <= size_ranges[:, None, 1])
    candidate = inside & in_range & gt_mask[None, :]
    cost = jnp.where(candidate, box_lib.area(gt_boxes)[None, :], jnp.inf)
    best = jnp.argmin(cost, axis=1)  # the first of equal minima: the lower box index
    positive = jnp.isfinite(jnp.min(cost, axis=1))
    labels = jnp.where(positive, gt_labels[best], BACKGROUND).astype(jnp.int32)
    assigned = jnp.where(positive[:, None], gt_boxes[best], 0.0)
    ltrb = jnp.take_along_axis(distances, best[:, None, None], axis=1)[:, 0]
    return Targets(labels=labels, boxes=assigned,
                   distances=jnp.where(positive[:, None], ltrb / strides[:, None], 0.0),
                   centerness=jnp.where(positive, box_lib.centerness(ltrb), 0.0))


def assign_batch(points: jax.Array, strides: jax.Array, size_ranges: jax.Array, gt_boxes: jax.Array,
                 gt_labels: jax.Array, gt_mask: jax.Array, center_radius: float = 1.5) -> Targets:
    """`assign` over a batch: gt_boxes (B, M, 4), gt_labels (B, M), gt_mask (B, M) -> Targets with (B, N, ...)."""
    return jax.vmap(assign, in_axes=(None, None, None, 0, 0, 0, None))(
        points, strides, size_ranges, gt_boxes, gt_labels, gt_mask, center_radius)
