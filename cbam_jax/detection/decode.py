"""From dense outputs to a fixed number of detections per image: scores, top-k candidates, box
decoding, clipping and class-aware (batched) non-maximum suppression, all with static shapes."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cbam_jax.detection import boxes as box_lib


class Detections(NamedTuple):
    """Per image, `max_detections` rows in decreasing score order; `valid` marks the real ones
    (padding rows are zeros). boxes (B, D, 4) in input pixels, scores (B, D), classes (B, D) int32."""

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: float) -> jax.Array:
    """Greedy NMS of one image's candidates: (K, 4), (K,), (K,) -> keep mask (K,).

    Candidates are visited by decreasing score; equal scores in index order (a stable sort), so of
    two identical boxes with the same score the lower index is kept. A candidate is dropped when its
    IoU with an already kept one is > `iou_threshold`.
    """
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    sorted_boxes, sorted_valid = boxes[order], valid[order]
    overlaps = box_lib.pairwise_iou(sorted_boxes, sorted_boxes) > iou_threshold
    count = scores.shape[0]

    def visit(i, keep):
        suppressed = jnp.any(keep & overlaps[:, i] & (jnp.arange(count) < i))
        return keep.at[i].set(sorted_valid[i] & ~suppressed)

    keep_sorted = jax.lax.fori_loop(0, count, visit, jnp.zeros(count, bool))
    return jnp.zeros(count, bool).at[order].set(keep_sorted)


def batched_nms(boxes: jax.Array, scores: jax.Array, classes: jax.Array, valid: jax.Array, iou_threshold: float,
                max_detections: int) -> Detections:
    """Class-aware NMS of one image's candidates (K, ...): boxes of different classes never suppress each
    other (each class is shifted to its own region of the plane). Returns the `max_detections` best kept
    (unbatched `Detections`: (D, 4), (D,), (D,), (D,))."""
    shift = (jnp.max(jnp.where(valid[:, None], jnp.abs(boxes), 0.0)) + 1.0) * classes.astype(boxes.dtype)
    keep = nms(boxes + shift[:, None], scores, valid, iou_threshold)
    count = scores.shape[0]
    if count < max_detections:  # pad the candidates so that top_k can return D rows
        pad = max_detections - count
        boxes, scores = jnp.pad(boxes, ((0, pad), (0, 0))), jnp.pad(scores, (0, pad))
        classes, keep = jnp.pad(classes, (0, pad)), jnp.pad(keep, (0, pad))
        count = max_detections
    # Kept candidates by decreasing score, ties by index: rank keys (score, -index) lexicographically.
    order = jnp.lexsort((jnp.arange(count), jnp.where(keep, -scores, jnp.inf)))[:max_detections]
    chosen = keep[order]
    return Detections(boxes=jnp.where(chosen[:, None], boxes[order], 0.0), scores=jnp.where(chosen, scores[order], 0.0),
                      classes=jnp.where(chosen, classes[order], 0).astype(jnp.int32), valid=chosen)


def detect(class_logits: jax.Array, distances: jax.Array, centerness_logits: jax.Array, points: jax.Array,
           strides: jax.Array, image_size: tuple[int, int], *, score_threshold: float = 0.05,
           pre_nms_top_k: int = 1000, iou_threshold: float = 0.6, max_detections: int = 100) -> Detections:
    """Detections of a batch from the head's outputs (B, N, K), (B, N, 4), (B, N) and the points (N, 2), (N,).

    The score of a class at a point is sqrt(sigmoid(class logit) * sigmoid(centerness logit)); the
    `pre_nms_top_k` best (point, class) pairs above `score_threshold` are decoded, clipped to the image
    (H, W), and suppressed per class at `iou_threshold`.
    """
    num_points, num_classes = class_logits.shape[1:]
    k = min(pre_nms_top_k, num_points * num_classes)

    def one_image(logits, image_distances, centerness):
        scores = jnp.sqrt(jax.nn.sigmoid(logits) * jax.nn.sigmoid(centerness)[:, None]).reshape(-1)
        top_scores, index = jax.lax.top_k(scores, k)
        point, cls = index // num_classes, index % num_classes
        boxes = box_lib.decode(points[point], image_distances[point], strides[point])
        limit = jnp.asarray([image_size[1], image_size[0]] * 2, boxes.dtype)
        boxes = jnp.clip(boxes, 0.0, limit)
        valid = (top_scores > score_threshold) & (box_lib.area(boxes) > 0)
        return batched_nms(boxes, top_scores, cls, valid, iou_threshold, max_detections)

    return jax.vmap(one_image)(class_logits, distances, centerness_logits)
