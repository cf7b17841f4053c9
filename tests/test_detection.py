"""The detector's building blocks on hand-computed cases: boxes, points, assignment, losses, NMS,
decoding, the model and its config."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax.detection import assign as assign_lib
from cbam_jax.detection import boxes as box_lib
from cbam_jax.detection import decode as decode_lib
from cbam_jax.detection import losses, points as points_lib
from cbam_jax.detection.detector import FCOS, create_detector, detector_config, detector_from_config
from cbam_jax.errors import InvalidInput
from tests.helpers import randomize


# ---- boxes -------------------------------------------------------------------------------------

def test_iou_and_giou_hand_computed():
    a = jnp.asarray([0.0, 0.0, 2.0, 2.0])
    b = jnp.asarray([1.0, 1.0, 3.0, 3.0])  # intersection 1, union 7, enclosing 9
    assert float(box_lib.iou(a, b)) == pytest.approx(1 / 7)
    assert float(box_lib.giou(a, b)) == pytest.approx(1 / 7 - (9 - 7) / 9)
    far = jnp.asarray([4.0, 0.0, 6.0, 2.0])  # no overlap; enclosing 6 x 2 = 12, union 8
    assert float(box_lib.iou(a, far)) == 0.0
    assert float(box_lib.giou(a, far)) == pytest.approx(-(12 - 8) / 12)
    assert float(box_lib.giou(a, a)) == pytest.approx(1.0)
    # Degenerate boxes: zero area, IoU 0 and no NaN.
    empty = jnp.asarray([1.0, 1.0, 1.0, 1.0])
    assert float(box_lib.area(jnp.asarray([2.0, 2.0, 1.0, 3.0]))) == 0.0
    assert float(box_lib.iou(empty, empty)) == 0.0 and math.isfinite(float(box_lib.giou(empty, empty)))


def test_pairwise_iou_shape_and_values():
    a = jnp.asarray([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = jnp.asarray([[0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 1.0]])
    expected = [[1.0, 1 / 7, 0.5], [0.25, 0.0, 0.5]]
    np.testing.assert_allclose(box_lib.pairwise_iou(a, b), expected, rtol=1e-6)


def test_box_coding_hand_computed_and_round_trip():
    point = jnp.asarray([[12.0, 20.0]])
    box = jnp.asarray([[4.0, 8.0, 28.0, 24.0]])
    encoded = box_lib.encode(point, box, jnp.asarray([8.0]))
    np.testing.assert_allclose(encoded, [[1.0, 1.5, 2.0, 0.5]])  # (8, 12, 16, 4) pixels / 8
    np.testing.assert_allclose(box_lib.decode(point, encoded, jnp.asarray([8.0])), box)
    rng = np.random.default_rng(0)
    points = jnp.asarray(rng.uniform(0, 100, (50, 2)), jnp.float32)
    distances = jnp.asarray(rng.uniform(0.1, 5, (50, 4)), jnp.float32)
    strides = jnp.asarray(rng.choice([8.0, 16.0, 32.0], 50), jnp.float32)
    np.testing.assert_allclose(box_lib.encode(points, box_lib.decode(points, distances, strides), strides),
                               distances, rtol=1e-5, atol=1e-5)


def test_centerness_hand_computed():
    # l, t, r, b = 1, 2, 3, 2: sqrt(1/3 * 2/2)
    assert float(box_lib.centerness(jnp.asarray([1.0, 2.0, 3.0, 2.0]))) == pytest.approx(math.sqrt(1 / 3))
    assert float(box_lib.centerness(jnp.asarray([2.0, 2.0, 2.0, 2.0]))) == pytest.approx(1.0)
    assert float(box_lib.centerness(jnp.asarray([-1.0, 2.0, 3.0, 2.0]))) == 0.0


# ---- points and assignment ---------------------------------------------------------------------

def test_points_per_level():
    shapes = points_lib.level_shapes((20, 33), (8, 16))
    assert shapes == ((3, 5), (2, 3))
    xy, strides, ranges = points_lib.points(shapes, (8, 16), (10.0,))
    assert xy.shape == (15 + 6, 2)
    np.testing.assert_allclose(xy[:2], [[4, 4], [12, 4]])  # row-major, cell centres
    np.testing.assert_allclose(xy[15], [8, 8])
    np.testing.assert_allclose(np.asarray(strides)[[0, 14, 15]], [8, 8, 16])
    np.testing.assert_allclose(ranges[0], [0, 10])
    assert ranges[15, 0] == 10 and np.isinf(ranges[15, 1])


def _grid():
    """Two levels over a 32 x 32 input: stride 8 (4 x 4) for sizes <= 12, stride 16 (2 x 2) above."""
    return points_lib.points(points_lib.level_shapes((32, 32), (8, 16)), (8, 16), (12.0,))


def test_assignment_hand_computed():
    xy, strides, ranges = _grid()
    gt = jnp.asarray([[0.0, 0.0, 16.0, 16.0],  # small: largest distance from (4,4),(12,4),(4,12),(12,12) is 12
                      [0.0, 0.0, 32.0, 32.0],  # large: level 2 (distances up to 24 from the stride-16 points)
                      [0.0, 0.0, 0.0, 0.0]])  # padding
    labels = jnp.asarray([2, 5, 7])
    mask = jnp.asarray([True, True, False])
    targets = assign_lib.assign(xy, strides, ranges, gt, labels, mask, center_radius=0.0)
    expected = np.full(20, -1)
    expected[[0, 1, 4, 5]] = 2  # the four stride-8 points inside the small box
    expected[16:] = 5  # all stride-16 points: inside the large box, largest distance 24 > 12
    np.testing.assert_array_equal(targets.labels, expected)
    # Point (12, 12) in the small box: ltrb (12, 12, 4, 4) / 8.
    np.testing.assert_allclose(targets.distances[5], [1.5, 1.5, 0.5, 0.5])
    np.testing.assert_allclose(targets.centerness[5], math.sqrt(4 / 12 * 4 / 12), rtol=1e-6)
    np.testing.assert_allclose(targets.boxes[16], [0, 0, 32, 32])
    assert float(targets.centerness[2]) == 0 and np.all(np.asarray(targets.distances[2]) == 0)


def test_assignment_smallest_area_wins_and_ties_go_to_lower_index():
    xy, strides, ranges = _grid()
    gt = jnp.asarray([[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 12.0, 12.0], [0.0, 0.0, 12.0, 12.0]])
    targets = assign_lib.assign(xy, strides, ranges, gt, jnp.asarray([0, 1, 2]), jnp.ones(3, bool), 0.0)
    # (4, 4) is inside all three, each within range (largest distances 12, 8, 8): the smaller area wins,
    # equal areas go to the lower index.
    assert int(targets.labels[0]) == 1
    assert int(targets.labels[1]) == 0  # (12, 4) lies on the right edge of the 12-pixel boxes: not inside
    # (20, 4) is in no box.
    assert int(targets.labels[2]) == -1


def test_assignment_center_sampling_and_empty_image():
    xy, strides, ranges = _grid()
    gt = jnp.asarray([[0.0, 0.0, 16.0, 16.0]])
    # Radius 0.5 stride around the centre (8, 8): the region [4, 12] holds no point strictly inside.
    targets = assign_lib.assign(xy, strides, ranges, gt, jnp.asarray([1]), jnp.ones(1, bool), center_radius=0.5)
    assert np.all(np.asarray(targets.labels) == -1)
    targets = assign_lib.assign(xy, strides, ranges, gt, jnp.asarray([1]), jnp.ones(1, bool), center_radius=1.5)
    assert sorted(np.flatnonzero(np.asarray(targets.labels) >= 0)) == [0, 1, 4, 5]
    empty = assign_lib.assign(xy, strides, ranges, gt, jnp.asarray([1]), jnp.zeros(1, bool))
    assert np.all(np.asarray(empty.labels) == -1)


# ---- losses ------------------------------------------------------------------------------------

def test_focal_loss_hand_computed():
    logit = jnp.asarray([0.0, math.log(3.0)])  # p = 0.5, 0.75
    positive = losses.sigmoid_focal_loss(logit, jnp.ones(2), alpha=0.25, gamma=2.0)
    np.testing.assert_allclose(positive, [0.25 * 0.25 * math.log(2), 0.25 * 0.0625 * -math.log(0.75)], rtol=1e-6)
    negative = losses.sigmoid_focal_loss(logit, jnp.zeros(2), alpha=0.25, gamma=2.0)
    np.testing.assert_allclose(negative, [0.75 * 0.25 * math.log(2), 0.75 * 0.5625 * -math.log(0.25)], rtol=1e-6)
    # gamma 0, no alpha: plain binary cross-entropy.
    np.testing.assert_allclose(losses.sigmoid_focal_loss(logit, jnp.ones(2), alpha=-1, gamma=0.0),
                               [math.log(2), -math.log(0.75)], rtol=1e-6)


def test_fcos_loss_normalisation_and_perfect_boxes():
    xy = jnp.asarray([[4.0, 4.0], [12.0, 4.0]])
    strides = jnp.asarray([8.0, 8.0])
    targets = assign_lib.Targets(labels=jnp.asarray([[1, -1]]), boxes=jnp.asarray([[[0.0, 0, 8, 8], [0, 0, 0, 0]]]),
                                 distances=jnp.asarray([[[0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0]]]),
                                 centerness=jnp.asarray([[1.0, 0.0]]))
    logits = jnp.zeros((1, 2, 2))
    total, parts = losses.fcos_loss(logits, targets.distances + jnp.asarray([0.0, 0, 0, 0]), jnp.zeros((1, 2)),
                                    targets, xy, strides, num_classes=2)
    focal_pos, focal_neg = 0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)
    assert float(parts["classification"]) == pytest.approx(focal_pos + 3 * focal_neg, rel=1e-6)  # / 1 positive
    assert float(parts["box"]) == pytest.approx(0.0, abs=1e-6)  # decoded boxes equal the targets
    assert float(parts["centerness"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(total) == pytest.approx(focal_pos + 3 * focal_neg + math.log(2), rel=1e-6)
    no_positive = targets._replace(labels=jnp.asarray([[-1, -1]]), centerness=jnp.zeros((1, 2)))
    total, parts = losses.fcos_loss(logits, targets.distances, jnp.zeros((1, 2)), no_positive, xy, strides, 2)
    assert float(parts["box"]) == 0.0 and float(parts["centerness"]) == 0.0 and math.isfinite(float(total))


# ---- NMS and decoding --------------------------------------------------------------------------

def _nms(boxes, scores, classes, valid, iou=0.5, max_detections=3):
    return jax.jit(decode_lib.batched_nms, static_argnums=(4, 5))(
        jnp.asarray(boxes, jnp.float32), jnp.asarray(scores, jnp.float32), jnp.asarray(classes),
        jnp.asarray(valid), iou, max_detections)


def test_nms_hand_computed():
    boxes = [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]]  # IoU(0, 1) = 81 / 119
    out = _nms(boxes, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1], [True] * 4, iou=0.5, max_detections=4)
    np.testing.assert_allclose(out.scores, [0.9, 0.7, 0.6, 0.0])  # 1 suppressed; 3 is another class
    np.testing.assert_array_equal(out.valid, [True, True, True, False])
    np.testing.assert_array_equal(out.classes, [0, 0, 1, 0])
    np.testing.assert_allclose(out.boxes[3], [0, 0, 0, 0])
    out = _nms(boxes, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1], [True] * 4, iou=0.7, max_detections=4)
    np.testing.assert_allclose(out.scores, [0.9, 0.8, 0.7, 0.6])  # 0.68 <= 0.7: both kept


def test_nms_ties_keep_the_lower_index():
    boxes = [[5, 5, 15, 15], [0, 0, 10, 10], [0, 0, 10, 10]]
    out = _nms(boxes, [0.5, 0.8, 0.8], [0, 0, 0], [True] * 3, max_detections=3)
    np.testing.assert_allclose(out.boxes[0], [0, 0, 10, 10])
    np.testing.assert_allclose(out.scores, [0.8, 0.5, 0.0])  # index 2 (tie, same box) is suppressed by 1
    np.testing.assert_array_equal(out.valid, [True, True, False])
    # Identical boxes of different classes, same score: both kept, the lower index first.
    out = _nms([[0, 0, 10, 10]] * 2, [0.8, 0.8], [3, 1], [True, True], max_detections=2)
    np.testing.assert_array_equal(out.classes, [3, 1])


def test_nms_empty_and_full():
    out = _nms([[0, 0, 10, 10]] * 3, [0.9, 0.8, 0.7], [0, 0, 0], [False] * 3, max_detections=5)
    assert out.boxes.shape == (5, 4) and not np.any(np.asarray(out.valid)) and np.all(np.asarray(out.scores) == 0)
    # More disjoint candidates than max_detections: the best ones, in order.
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(6)]
    out = _nms(boxes, [0.1, 0.6, 0.3, 0.9, 0.5, 0.2], [0] * 6, [True] * 6, max_detections=4)
    np.testing.assert_allclose(out.scores, [0.9, 0.6, 0.5, 0.3])
    np.testing.assert_array_equal(out.valid, [True] * 4)


def test_detect_decodes_scores_boxes_and_threshold():
    xy = jnp.asarray([[4.0, 4.0], [12.0, 4.0]])
    strides = jnp.asarray([8.0, 8.0])
    logits = jnp.asarray([[[3.0, -9.0], [-9.0, -9.0]]])  # point 0, class 0 only
    distances = jnp.full((1, 2, 4), 0.5)  # a box of 8 x 8 around each point
    centerness = jnp.asarray([[3.0, 3.0]])
    # One compiled program for both calls (eagerly, each op and loop body compiles on its own: seconds).
    detect = jax.jit(functools.partial(decode_lib.detect, image_size=(16, 16), score_threshold=0.05,
                                       pre_nms_top_k=4, max_detections=2))
    out = detect(logits, distances, centerness, xy, strides)
    expected = math.sqrt(1 / (1 + math.exp(-3.0)) ** 2)
    np.testing.assert_allclose(out.scores[0], [expected, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out.boxes[0, 0], [0, 0, 8, 8])
    np.testing.assert_array_equal(out.valid[0], [True, False])
    # Boxes are clipped to the image.
    big = detect(logits, jnp.full((1, 2, 4), 2.0), centerness, xy, strides)
    np.testing.assert_allclose(big.boxes[0, 0], [0, 0, 16, 16])


# ---- the model ---------------------------------------------------------------------------------

TINY = dict(width=8, fpn_channels=16, head_convs=1, head_norm_groups=8,
            size_boundaries=(8.0, 16.0, 32.0, 64.0))


@pytest.mark.parametrize("backbone", ["cbam_resnet18", "resnet18"])
def test_detector_outputs_match_points_and_config_round_trip(backbone):
    options = {"reduction": 4} if backbone.startswith("cbam") else {}
    detector = create_detector(backbone, 3, backbone_options=options, **TINY)
    images = jnp.zeros((2, 40, 56, 3))
    variables = jax.eval_shape(detector.init, jax.random.key(0), images)
    outputs = jax.eval_shape(detector.apply, variables, images)
    xy, strides, _ = detector.points((40, 56))
    count = sum(-(-40 // s) * -(-56 // s) for s in (8, 16, 32, 64, 128))
    assert xy.shape == (count, 2) and strides.shape == (count,)
    assert outputs.class_logits.shape == (2, count, 3) and outputs.distances.shape == (2, count, 4)
    assert outputs.centerness_logits.shape == (2, count)
    assert set(variables["params"]) == {"backbone", "fpn", "head"}
    assert ("attention" in variables["params"]["backbone"]["layer1_0"]) == backbone.startswith("cbam")
    assert detector_from_config(detector_config(detector)) == detector


@pytest.mark.slow  # two forward passes of a ResNet-18 FCOS in training mode (~13 s on 2 loaded cores)
def test_frozen_backbone_batch_norm_keeps_statistics():
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    for train_bn in (True, False):
        detector = create_detector("resnet18", 2, train_backbone_bn=train_bn, **TINY)
        variables = randomize(jax.eval_shape(detector.init, jax.random.key(0), images))  # no eager init: seconds
        _, updates = detector.apply(variables, images, train=True, mutable=["batch_stats"])
        changed = not np.allclose(updates["batch_stats"]["backbone"]["bn1"]["mean"],
                                  variables["batch_stats"]["backbone"]["bn1"]["mean"])
        assert changed == train_bn


def test_detector_rejects_bad_backbones_and_options():
    with pytest.raises(InvalidInput, match="imagenet"):
        FCOS(backbone=create_detector("resnet18", 2, **TINY).backbone.clone(out_indices=(1, 2, 3)), num_classes=2)
    with pytest.raises(InvalidInput, match="head_norm_groups"):
        create_detector("resnet18", 2, **{**TINY, "head_norm_groups": 5})
    with pytest.raises(InvalidInput, match="size_boundaries"):
        create_detector("resnet18", 2, **{**TINY, "size_boundaries": (8.0, 16.0)})


def test_a_saved_detector_is_one_pretrained_folder_read_from_a_relative_path(tmp_path, monkeypatch):
    """save_detector writes the one pretrained format (model.safetensors + config.json with its digest);
    load_detector reads it back bit for bit, also from a relative path, and refuses a flipped bit."""
    import json

    from cbam_jax.detection.weights import load_detector, save_detector
    from cbam_jax.pretrained import DamagedWeights
    from tests.helpers import random_variables

    detector = create_detector("resnet18", 3, **TINY)
    variables = random_variables(detector, (1, 64, 64, 3))
    save_detector(tmp_path / "det", detector, variables, {"class_names": ["a", "b", "c"]})
    assert sorted(p.name for p in (tmp_path / "det").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "det" / "config.json").read_text())["weights_sha256"]
    monkeypatch.chdir(tmp_path)
    loaded, restored, metadata = load_detector("det")
    assert loaded == detector and metadata == {"class_names": ["a", "b", "c"]}
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves({k: variables[k] for k in restored})):
        assert np.shape(got) == np.shape(want)  # scalar parameters (the head's scales) stay scalars
        np.testing.assert_array_equal(got, want)
    weights = tmp_path / "det" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(DamagedWeights):
        load_detector("det")
