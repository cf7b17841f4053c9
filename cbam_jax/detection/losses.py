"""FCOS's losses: sigmoid focal loss (classes), GIoU loss (boxes), binary cross-entropy (centerness)."""

import jax
import jax.numpy as jnp
import optax

from cbam_jax.detection import boxes as box_lib
from cbam_jax.detection.assign import Targets


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """Elementwise focal loss (Lin et al. 2017) of logits and {0, 1} targets of the same shape:
    -alpha_t (1 - p_t)^gamma log(p_t); alpha < 0 turns the alpha weighting off."""
    p = jax.nn.sigmoid(logits)
    ce = optax.sigmoid_binary_cross_entropy(logits, targets)
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def giou_loss(predicted: jax.Array, target: jax.Array) -> jax.Array:
    """1 - GIoU of broadcastable (..., 4) boxes, in [0, 2)."""
    return 1.0 - box_lib.giou(predicted, target)


def fcos_loss(class_logits: jax.Array, distances: jax.Array, centerness_logits: jax.Array, targets: Targets,
              points: jax.Array, strides: jax.Array, num_classes: int, alpha: float = 0.25,
              gamma: float = 2.0, axis_name: str | tuple[str, ...] | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The FCOS loss of a batch.

    Args:
      class_logits: (B, N, num_classes); distances: (B, N, 4) predicted ltrb in strides (positive);
      centerness_logits: (B, N); targets: from `assign_batch` (B, N, ...); points (N, 2), strides (N,).

    Returns:
      (total, {'classification', 'box', 'centerness', 'positives'}): the focal loss summed over points
      and classes / positives; the GIoU loss weighted by the centerness targets / their sum; the
      centerness BCE / positives (FCOS's normalisation; a batch without positives gives 0 box and
      centerness losses). With `axis_name` (a per-device step under pmap) the normalisers are the
      batch's totals over the devices (FCOS's all-reduce of the positives), shared out: the mean of
      the devices' losses and gradients is the global batch's.
    """
    def normaliser(local: jax.Array, floor: float) -> jax.Array:
        # The batch's total over all devices, floored, then shared out: each device divides its own
        # sum by total / devices, so the mean of the devices' losses is the global batch's loss.
        if axis_name is None:
            return jnp.maximum(local, floor)
        return jnp.maximum(jax.lax.psum(local, axis_name), floor) / jax.lax.psum(1, axis_name)

    positive = targets.labels >= 0
    num_positive = jnp.sum(positive).astype(jnp.float32)
    positives = normaliser(num_positive, 1.0)
    one_hot = jax.nn.one_hot(targets.labels, num_classes)  # background (-1) -> all zeros
    classification = jnp.sum(sigmoid_focal_loss(class_logits, one_hot, alpha, gamma)) / positives
    predicted_boxes = box_lib.decode(points, distances, strides)
    weight = targets.centerness * positive
    box = jnp.sum(giou_loss(predicted_boxes, targets.boxes) * weight) / normaliser(jnp.sum(weight), 1e-6)
    bce = optax.sigmoid_binary_cross_entropy(centerness_logits, targets.centerness)
    centerness = jnp.sum(bce * positive) / positives
    if axis_name is not None:  # reported: the batch's count, whatever the devices
        num_positive = jax.lax.psum(num_positive, axis_name)
    total = classification + box + centerness
    return total, {"classification": classification, "box": box, "centerness": centerness, "positives": num_positive}
