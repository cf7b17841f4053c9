"""The generated detection set, the ground-truth checks, augmentation that moves boxes with the
image, resumable batches, and COCO evaluation against pycocotools run by hand."""

import json

import numpy as np
import pytest

from cbam_jax.detection import data
from cbam_jax.detection.coco_eval import coco_evaluate
from cbam_jax.errors import InvalidInput


def test_shapes_dataset_is_deterministic_and_valid():
    dataset = data.ShapesDataset(20, 48, seed=3, min_size=8, max_size=20)
    again = data.ShapesDataset(20, 48, seed=3, min_size=8, max_size=20)
    for i in (0, 7, 19):
        a, b = dataset[i], again[i]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["boxes"], b["boxes"])
        assert a["image"].shape == (48, 48, 3) and a["image"].dtype == np.uint8
        assert 1 <= len(a["boxes"]) <= 4 and np.all(a["boxes"] >= 0) and np.all(a["boxes"] <= 48)
        sides = a["boxes"][:, 2:] - a["boxes"][:, :2]
        assert np.all(sides >= 8) and np.all(sides <= 20) and set(a["labels"]) <= {0, 1, 2}
    other = data.ShapesDataset(20, 48, seed=4, min_size=8, max_size=20)
    assert not np.array_equal(dataset[0]["image"], other[0]["image"])
    test = data.ShapesDataset(20, 48, seed=3, split="test", min_size=8, max_size=20)
    assert not np.array_equal(dataset[0]["image"], test[0]["image"])


def test_shapes_are_drawn_inside_their_boxes():
    dataset = data.ShapesDataset(10, 48, seed=0, max_objects=1, min_size=12, max_size=20)
    for i in range(10):
        example = dataset[i]
        x0, y0, x1, y1 = example["boxes"][0].astype(int)
        bright = example["image"].min(-1) >= 120  # objects are drawn with channels >= 120, background < 120
        ys, xs = np.nonzero(bright)
        if example["labels"][0] == 0:  # a rectangle fills its box
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1


def _example(boxes, labels, height=20, width=10):
    image = np.zeros((height, width, 3), np.uint8)
    for x0, y0, x1, y1 in np.asarray(boxes, int):
        image[max(y0, 0):y1, max(x0, 0):x1] = 255
    return {"image": image, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4), "labels": np.asarray(labels, np.int32)}


def _white_box(image):
    ys, xs = np.nonzero(image.min(-1) > 127)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_flip_moves_boxes_with_the_image():
    example = _example([[1, 2, 4, 5]], [0])
    flipped = data.flip(example)
    np.testing.assert_allclose(flipped["boxes"], [[6, 2, 9, 5]])  # x -> 10 - x
    assert _white_box(flipped["image"]) == [6, 2, 9, 5]
    twice = data.flip(flipped)
    np.testing.assert_array_equal(twice["image"], example["image"])
    np.testing.assert_allclose(twice["boxes"], example["boxes"])


def test_resize_moves_boxes_with_the_image_and_clips():
    example = _example([[2, 4, 6, 10], [8, 16, 10, 20]], [0, 1])  # H 20, W 10
    out = data.resize_to_canvas(example, 2.0, 32)  # -> 40 x 20, cropped to 32 rows
    assert out["image"].shape == (32, 32, 3) and out["scale"] == 2.0
    np.testing.assert_allclose(out["boxes"], [[4, 8, 12, 20]])  # the second, [16, 32, 20, 40], is cut off
    np.testing.assert_array_equal(out["labels"], [0])
    assert np.all(out["image"][:, 20:] == 0)  # the canvas right of the image is black
    small = data.resize_to_canvas(_example([[2, 4, 6, 10]], [0]), 0.5, 32)
    np.testing.assert_allclose(small["boxes"], [[1, 2, 3, 5]])
    assert _white_box(small["image"])[0] >= 0  # the square is still there, near its box
    rng = np.random.default_rng(0)
    for _ in range(5):  # random augmentation: the drawn square stays within a pixel of its box
        augmented = data.augment(_example([[2, 4, 8, 12]], [1], 24, 24), rng, 32, 0.5, (0.6, 1.4))
        drawn = np.asarray(_white_box(augmented["image"]), float)
        np.testing.assert_allclose(drawn, augmented["boxes"][0], atol=1.0)


def test_check_example_documented_handling_and_errors():
    fine = data.check_example(_example([[-3, 2, 4, 30], [5, 5, 5, 9], [2, 2, 2.5, 9]], [0, 1, 2]), 3, 10, "ex")
    np.testing.assert_allclose(fine["boxes"], [[0, 2, 4, 20]])  # clipped; the zero-width and 0.5-wide dropped
    np.testing.assert_array_equal(fine["labels"], [0])
    empty = data.check_example(_example(np.zeros((0, 4)), []), 3, 10, "ex")
    assert empty["boxes"].shape == (0, 4)
    with pytest.raises(InvalidInput, match=r"^example 4: class id 3 is outside 0\.\.2"):
        data.check_example(_example([[0, 0, 4, 4]], [3]), 3, 10, "example 4")
    with pytest.raises(InvalidInput, match="non-finite"):
        data.check_example(_example([[0, 0, 4, 4]], [0]) | {"boxes": np.asarray([[0, 0, np.nan, 4]])}, 3, 10, "ex")
    with pytest.raises(InvalidInput, match="max_boxes = 1"):
        data.check_example(_example([[0, 0, 4, 4], [4, 4, 8, 8]], [0, 0]), 3, 1, "ex")


def test_train_batches_resume_exactly_and_pad():
    source = data.ShapesDataset(10, 32, seed=0, min_size=6, max_size=12)
    options = dict(num_classes=3, max_boxes=6, size=32, flip_probability=0.5, scale_range=(0.8, 1.2))
    stream = data.TrainBatches(source, 4, seed=1, **options)
    batches = [next(stream) for _ in range(5)]  # 2 per epoch: crosses two epoch boundaries
    assert batches[0]["image"].shape == (4, 32, 32, 3) and batches[0]["boxes"].shape == (4, 6, 4)
    np.testing.assert_array_equal(batches[0]["mask"].sum(1), [len(source[i]["boxes"]) for i in batches[0]["index"]])
    assert not np.any(batches[0]["boxes"][~batches[0]["mask"]])
    resumed = data.TrainBatches(source, 4, seed=1, **options)
    resumed.set_state(json.loads(json.dumps(stream.get_state())) | {"next_batch": 3})
    for expected in batches[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    assert not np.array_equal(batches[0]["index"], batches[2]["index"])  # a new permutation each epoch


def test_eval_batches_cover_the_split_once():
    source = data.ShapesDataset(5, 32, seed=0, min_size=6, max_size=12)
    batches = list(data.eval_batches(source, 2, num_classes=3, max_boxes=6, size=32))
    assert [b["valid"].tolist() for b in batches] == [[True, True], [True, True], [True, False]]
    assert [i for b in batches for i, v in zip(b["index"], b["valid"]) if v] == list(range(5))


# ---- COCO evaluation -----------------------------------------------------------------------------

def test_coco_evaluation_hand_computed():
    ground_truth = [(np.asarray([[0, 0, 10, 10]]), np.asarray([0]))]
    perfect = [(np.asarray([[0, 0, 10, 10]]), np.asarray([0.9]), np.asarray([0]))]
    assert coco_evaluate(ground_truth, perfect, 2)["mAP"] == pytest.approx(1.0)
    # A false positive ranked above the true one: precision 1/2 at recall 1 at every IoU threshold.
    ranked_wrong = [(np.asarray([[20, 20, 30, 30], [0, 0, 10, 10]]), np.asarray([0.9, 0.8]), np.asarray([0, 0]))]
    result = coco_evaluate(ground_truth, ranked_wrong, 2)
    assert result["mAP"] == pytest.approx(0.5) and result["mAP50"] == pytest.approx(0.5)
    # IoU 0.81 (box shifted by 1 of 10, 90 / 110): counts at thresholds .50-.80 (7 of 10) -> mAP 0.7.
    shifted = [(np.asarray([[1, 0, 11, 10]]), np.asarray([0.9]), np.asarray([0]))]
    result = coco_evaluate(ground_truth, shifted, 2)
    assert result["mAP"] == pytest.approx(0.7) and result["mAP75"] == pytest.approx(1.0)
    assert result["mAP_small"] == pytest.approx(0.7) and result["mAP_large"] == -1  # 100 px^2 is "small"
    assert coco_evaluate(ground_truth, [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))], 2)["mAP"] == 0.0


def test_coco_evaluation_equals_pycocotools_by_hand(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    ground_truth, detections = [], []
    annotations, results = [], []
    for image in range(6):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 60, (n, 2))
        wh = rng.uniform(4, 40, (n, 2))
        labels = rng.integers(0, 3, n)
        ground_truth.append((np.concatenate([xy, xy + wh], 1), labels))
        for box_xy, box_wh, label in zip(xy, wh, labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image + 1, "category_id": int(label) + 1,
                                "bbox": [*box_xy, *box_wh], "area": float(box_wh[0] * box_wh[1]), "iscrowd": 0})
        d = int(rng.integers(0, 6))
        jitter = rng.normal(0, 3, (d, 4))
        pick = rng.integers(0, max(n, 1), d)
        base = np.concatenate([xy, xy + wh], 1)[pick] if n else rng.uniform(0, 60, (d, 4))
        moved = base + jitter
        boxes = np.concatenate([np.minimum(moved[:, :2], moved[:, 2:]), np.maximum(moved[:, :2], moved[:, 2:])], 1)
        scores = rng.uniform(0, 1, d)
        classes = rng.integers(0, 3, d)
        detections.append((boxes, scores, classes))
        for box, score, label in zip(boxes, scores, classes):
            results.append({"image_id": image + 1, "category_id": int(label) + 1,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": float(score)})
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [{"id": i + 1} for i in range(6)], "annotations": annotations,
                                "categories": [{"id": c + 1} for c in range(3)]}))
    coco = COCO(str(path))
    evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    ours = coco_evaluate(ground_truth, detections, 3)
    np.testing.assert_allclose(list(ours.values()), evaluator.stats[:6], rtol=0, atol=1e-12)
    assert 0 < ours["mAP50"] < 1  # a non-trivial case


def test_tfds_records_become_pixel_boxes_without_crowds():
    record = {"image": np.zeros((20, 40, 3), np.uint8),
              "objects": {"bbox": np.asarray([[0.1, 0.25, 0.5, 0.75], [0.0, 0.0, 1.0, 1.0]], np.float32),
                          "label": np.asarray([4, 7]), "is_crowd": np.asarray([False, True])}}
    example = data.TfdsDetectionSource([record])[0]
    np.testing.assert_allclose(example["boxes"], [[10, 2, 30, 10]])  # (ymin, xmin, ymax, xmax) -> x0, y0, x1, y1
    np.testing.assert_array_equal(example["labels"], [4])
    grey = {"image": np.zeros((4, 4), np.uint8), "objects": {"bbox": np.zeros((0, 4)), "label": np.zeros(0, int),
                                                              "is_difficult": np.zeros(0, bool)}}
    example = data.TfdsDetectionSource([grey])[0]
    assert example["image"].shape == (4, 4, 3) and example["boxes"].shape == (0, 4)


def test_write_shapes_images_for_the_demo(tmp_path, capsys):
    """`python -m cbam_jax.detection.data FOLDER COUNT` (make detect-demo) writes the held-out images as PNGs."""
    from PIL import Image

    from cbam_jax.detection.data import ShapesDataset, main

    assert main([str(tmp_path / "samples"), "3"]) == 0
    written = sorted((tmp_path / "samples").iterdir())
    assert [p.name for p in written] == ["shapes_0.png", "shapes_1.png", "shapes_2.png"]
    held_out = ShapesDataset(3, 64, seed=0, split="test")
    for index, path in enumerate(written):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), held_out[index]["image"])
    assert main([str(tmp_path / "other"), "three"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "other").exists()
