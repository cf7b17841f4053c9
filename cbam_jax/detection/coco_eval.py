"""COCO-style evaluation with pycocotools: mAP@[.5:.95], mAP@.5, mAP@.75 and per object size.

Ground truth and detections are per-image arrays in the same pixel coordinates; they become
pycocotools' in-memory datasets (image ids 1.., category id = class id + 1, boxes as (x, y, w, h),
area = box area, no crowd regions) and `COCOeval` computes the standard twelve numbers; the six
box-AP ones are returned.
"""

import contextlib
import io
from collections.abc import Sequence

import numpy as np

from cbam_jax.errors import MissingDependency

METRICS = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large")


def _pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise MissingDependency("COCO evaluation needs pycocotools: pip install 'cbam-jax[detection]' "
                                "(or pip install pycocotools).") from None
    return COCO, COCOeval


def _xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)


def coco_datasets(ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
                  detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> tuple[dict, list]:
    """(the ground-truth dataset dict, the result list) in pycocotools' format.

    ground_truth: per image (boxes (n, 4), labels (n,)); detections: per image (boxes (d, 4), scores (d,),
    labels (d,)), both (x0, y0, x1, y1)."""
    images, annotations, results = [], [], []
    for image_id, (boxes, labels) in enumerate(ground_truth, start=1):
        images.append({"id": image_id})
        for box, label in zip(_xywh(boxes), np.asarray(labels).reshape(-1)):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label) + 1,
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
    for image_id, (boxes, scores, labels) in enumerate(detections, start=1):
        for box, score, label in zip(_xywh(boxes), np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)):
            results.append({"image_id": image_id, "category_id": int(label) + 1, "bbox": [float(v) for v in box],
                            "score": float(score)})
    dataset = {"images": images, "annotations": annotations,
               "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    return dataset, results


def coco_evaluate(ground_truth: Sequence[tuple[np.ndarray, np.ndarray]],
                  detections: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int) -> dict[str, float]:
    """{'mAP', 'mAP50', 'mAP75', 'mAP_small', 'mAP_medium', 'mAP_large'} of `detections` against
    `ground_truth` (see `coco_datasets`). No detections at all: every figure 0. A size range without
    ground truth: -1 (pycocotools' convention)."""
    if len(ground_truth) != len(detections):
        raise ValueError(f"coco_evaluate: {len(ground_truth)} ground-truth images but {len(detections)} detection lists.")
    COCO, COCOeval = _pycocotools()
    dataset, results = coco_datasets(ground_truth, detections, num_classes)
    if not results:  # pycocotools cannot load an empty result list
        return {name: 0.0 for name in METRICS}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its table
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(METRICS, evaluator.stats[:6])}
