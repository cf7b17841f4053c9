"""`cbam-jax export`: the StableHLO and ONNX artifacts equal the model at two batch sizes and two
input sizes, carry the preprocessing metadata, run with jax alone, and bad input fails cleanly."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import cbam_jax
from cbam_jax import cli
from cbam_jax.artifacts import ExportError, onnx_graph
from cbam_jax.artifacts.check import check_close
from cbam_jax.pretrained import save_pretrained
from tests.helpers import random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPROCESSING = {"resize": 18, "crop": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small CBAM-ResNet (ImageNet stem: conv 7x7/2 and max pool) with the default (CPU fast path)
    implementation, as training would save it, with random weights: at their initial values the
    BatchNorms are the identity and the spatial gate's BatchNorm scale is 0, so the gate is a constant
    0.5 and its pools and convolution would never reach the output."""
    model = cbam_jax.ResNet(stage_sizes=(1, 1), block="basic", num_classes=4, stem="imagenet", attention="cbam",
                            attention_options={"reduction": 4}, width=8)
    variables = random_variables(model, (1, 16, 16, 3))
    path = tmp_path_factory.mktemp("models") / "cbam"
    save_pretrained(path, model, variables,
                    metadata={"preprocessing": PREPROCESSING, "class_names": ["ant", "bee", "cat", "dog"]})
    return path, model, variables


def _images(batch, height, width, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, height, width, 3)).astype(np.float32)


def _relative_error(actual, expected):
    """Max abs difference over the logit scale (max |expected|)."""
    return float(np.max(np.abs(np.asarray(actual) - expected))) / float(np.max(np.abs(expected)))


@pytest.mark.slow
def test_artifacts_equal_the_model_at_two_batch_and_input_sizes(model_dir, tmp_path, capsys):
    path, model, variables = model_dir
    reference = jax.jit(model.apply)
    for size, out in ((None, tmp_path / "a"), ((20, 12), tmp_path / "b")):
        options = [] if size is None else ["--height", str(size[0]), "--width", str(size[1])]
        assert cli.main(["export", str(path), str(out), *options]) == 0
        assert "model.jax_export" in capsys.readouterr().out
        height, width = size or (16, 16)  # default: the preprocessing crop
        document = json.loads((out / "artifact.json").read_text())
        assert document["input"]["shape"] == ["batch", height, width, 3]
        assert document["preprocessing"] == PREPROCESSING and document["class_names"][1] == "bee"
        exported = jax.export.deserialize(bytearray((out / "model.jax_export").read_bytes()))
        # Portable: lowered for every backend, without the CPU fast path's barriers.
        assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
        assert "optimization_barrier" not in exported.mlir_module()
        proto = (out / "model.onnx").read_bytes()
        import onnx

        props = {p.key: p.value for p in onnx.load_from_string(proto).metadata_props}
        assert json.loads(props["cbam_jax"])["preprocessing"] == PREPROCESSING
        for batch in (1, 3):
            images = _images(batch, height, width, seed=batch)
            expected = np.asarray(reference(variables, images))
            assert _relative_error(exported.call(images), expected) <= 1e-5
            assert _relative_error(onnx_graph.run_onnx(proto, images), expected) <= 1e-4


@pytest.mark.slow
def test_dynamic_size_stablehlo_takes_any_height_and_width(model_dir, tmp_path):
    path, model, variables = model_dir
    out = tmp_path / "dynamic"
    assert cli.main(["export", str(path), str(out), "--dynamic-size", "--formats", "stablehlo"]) == 0
    assert sorted(os.listdir(out)) == ["artifact.json", "model.jax_export", "run_exported.py"]
    exported = jax.export.deserialize(bytearray((out / "model.jax_export").read_bytes()))
    for batch, height, width in ((1, 16, 16), (2, 23, 31)):
        images = _images(batch, height, width)
        expected = np.asarray(jax.jit(model.apply)(variables, images))
        assert _relative_error(exported.call(images), expected) <= 1e-5


@pytest.mark.slow
def test_run_exported_script_needs_only_jax(model_dir, tmp_path):
    path, model, variables = model_dir
    out = tmp_path / "served"
    assert cli.main(["export", str(path), str(out), "--formats", "stablehlo"]) == 0
    pixels = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    # Every cbam-jax dependency but jax (and numpy) made unimportable.
    blocked = ["cbam_jax", "flax", "optax", "orbax", "onnx", "onnxruntime", "grain", "PIL", "tensorflow_datasets"]
    code = (f"import sys, runpy\nfor name in {blocked!r}: sys.modules[name] = None\n"
            f"sys.argv = ['run_exported.py', {str(out)!r}, {str(tmp_path / 'images.npy')!r}, '--top-k', '2']\n"
            f"runpy.run_path({str(out / 'run_exported.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    x = (pixels / 255.0 - np.asarray(PREPROCESSING["mean"])) / np.asarray(PREPROCESSING["std"])
    expected = np.argsort(-np.asarray(jax.jit(model.apply)(variables, x.astype(np.float32))), axis=-1)[:, :2]
    names = ["ant", "bee", "cat", "dog"]
    assert [[entry["class"] for entry in row] for row in rows] == [[names[i] for i in r] for r in expected]


@pytest.mark.parametrize("arguments, message", [
    (["--dynamic-size"], "symbolic batch only"),
    (["--height", "0", "--width", "8"], "positive integers"),
    (["--height", "8"], "give both --height and --width"),
    ([], "input size is unknown"),
    (["--formats", "tflite"], "unknown format"),
])
def test_unsupported_cases_fail_at_export_time_and_write_nothing(model_dir, tmp_path, capsys, arguments, message):
    path, _, _ = model_dir
    out = tmp_path / "out"
    if not arguments:  # no default size: a model whose metadata has no preprocessing
        bare = tmp_path / "bare"
        save_pretrained(bare, *cbam_jax.load_pretrained(path))
        path = bare
    assert cli.main(["export", str(path), str(out), *arguments]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Nothing was written" in err
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".out")]


def test_existing_output_and_missing_model_are_refused(model_dir, tmp_path, capsys):
    path, _, _ = model_dir
    (tmp_path / "taken").mkdir()
    assert cli.main(["export", str(path), str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err and os.listdir(tmp_path / "taken") == []
    assert cli.main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "no existing directory" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_the_self_check_is_relative_to_the_output_scale_and_refuses_nan():
    expected = np.array([[100.0, -50.0], [3.0, 0.0]])
    check_close("ONNX artifact's output", expected + 0.9e-3, expected, 1e-5)  # 0.9e-3 <= 1e-5 x 100
    with pytest.raises(ExportError, match="ONNX artifact's class_logits differs from the model's by 0.0011"):
        check_close("ONNX artifact's class_logits", expected + 1.1e-3, expected, 1e-5)
    with pytest.raises(ExportError, match="by 2e-05"):  # below 1 the scale is 1: an absolute tolerance
        check_close("output", expected / 1000 + 2e-5, expected / 1000, 1e-5)
    with pytest.raises(ExportError, match="by nan"):
        check_close("output", np.where(expected > 50, np.nan, expected), expected, 1e-5)


def test_onnx_names_a_primitive_it_cannot_translate():
    spec = jax.ShapeDtypeStruct(cbam_jax.artifacts.input_shape(4, 4, 3), jnp.float32)
    with pytest.raises(ExportError, match="primitive 'sort'"):
        onnx_graph.export_onnx(lambda x: jnp.sort(x, axis=1), spec)


@pytest.mark.slow
def test_a_wrong_onnx_op_fails_the_parity_and_the_self_check(model_dir, tmp_path, monkeypatch):
    """Subtraction exported as addition (a one-word slip in the translator's table) is seen by the
    parity check on the random weights and refused by the export command's own self-check."""
    path, model, variables = model_dir
    spec = jax.ShapeDtypeStruct(cbam_jax.artifacts.input_shape(16, 16, 3), jnp.float32)
    forward = model.clone(implementation="xla")
    images = _images(2, 16, 16)
    expected = np.asarray(jax.jit(forward.apply)(variables, images))
    right = onnx_graph.export_onnx(lambda x: forward.apply(variables, x), spec)
    assert _relative_error(onnx_graph.run_onnx(right, images), expected) <= 1e-4
    monkeypatch.setitem(onnx_graph._HANDLERS, "sub", onnx_graph._elementwise("Add"))
    wrong = onnx_graph.export_onnx(lambda x: forward.apply(variables, x), spec)
    assert _relative_error(onnx_graph.run_onnx(wrong, images), expected) > 1e-2
    with pytest.raises(ExportError, match="ONNX artifact's output differs"):
        cbam_jax.artifacts.export_artifacts(path, tmp_path / "out", formats=["onnx"])
    # Freshly initialised weights hide the slip (the spatial gate is a constant 0.5): the self-check
    # also runs a randomised copy of the weights, which does not.
    fresh = tmp_path / "fresh"
    save_pretrained(fresh, model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3))),
                    metadata={"preprocessing": PREPROCESSING})
    with pytest.raises(ExportError, match="ONNX artifact's output differs"):
        cbam_jax.artifacts.export_artifacts(fresh, tmp_path / "out", formats=["onnx"])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_self_check_tolerance_follows_the_logit_scale(model_dir, tmp_path):
    """Logits of order 1e4 (a head scaled up) export: the self-check's bound is relative to them."""
    path, model, variables = model_dir
    big = jax.tree.map(lambda a: a, variables)
    big["params"]["fc"] = jax.tree.map(lambda a: a * 1e4, variables["params"]["fc"])
    save_pretrained(tmp_path / "big", model, big, metadata={"preprocessing": PREPROCESSING})
    cbam_jax.artifacts.export_artifacts(tmp_path / "big", tmp_path / "out")
    exported = jax.export.deserialize(bytearray((tmp_path / "out" / "model.jax_export").read_bytes()))
    expected = np.asarray(jax.jit(model.apply)(big, _images(2, 16, 16)))
    assert np.max(np.abs(expected)) > 1e3
    assert _relative_error(exported.call(_images(2, 16, 16)), expected) <= 1e-5


def _as_float(b):
    return lax.convert_element_type(b, jnp.float32)


# One function per entry of the ONNX translator's elementwise table, each made of that primitive
# (the inputs of log, sqrt and pow made positive, booleans made from comparisons).
ELEMENTWISE_CASES = {
    "add": lax.add, "sub": lax.sub, "mul": lax.mul, "div": lax.div, "max": lax.max, "min": lax.min,
    "pow": lambda x, y: lax.pow(lax.abs(x), y), "neg": lambda x, y: lax.neg(x), "sign": lambda x, y: lax.sign(x),
    "exp": lambda x, y: lax.exp(x), "log": lambda x, y: lax.log(lax.abs(x)), "sqrt": lambda x, y: lax.sqrt(lax.abs(x)),
    "logistic": lambda x, y: lax.logistic(x), "tanh": lambda x, y: lax.tanh(x), "abs": lambda x, y: lax.abs(x),
    "eq": lambda x, y: _as_float(lax.eq(x, y)), "gt": lambda x, y: _as_float(lax.gt(x, y)),
    "lt": lambda x, y: _as_float(lax.lt(x, y)), "ge": lambda x, y: _as_float(lax.ge(x, y)),
    "le": lambda x, y: _as_float(lax.le(x, y)),
    "and": lambda x, y: _as_float(lax.bitwise_and(lax.gt(x, 0.0), lax.gt(y, 0.0))),
    "or": lambda x, y: _as_float(lax.bitwise_or(lax.gt(x, 0.0), lax.gt(y, 0.0))),
    "not": lambda x, y: _as_float(lax.bitwise_not(lax.gt(x, 0.0))),
    "copy": lambda x, y: lax.copy_p.bind(x), "stop_gradient": lambda x, y: lax.stop_gradient(x),
}
# Names of the same primitive in other jax versions (`copy` is `copy_p`'s name on this one).
ELEMENTWISE_ALIASES = {"copy_p"}


def test_every_elementwise_entry_is_checked():
    assert set(onnx_graph._ELEMENTWISE) - set(ELEMENTWISE_CASES) == ELEMENTWISE_ALIASES


@pytest.mark.parametrize("primitive", sorted(ELEMENTWISE_CASES))
def test_elementwise_table_entry_computes_its_primitive(primitive):
    """Each table entry's ONNX op computes what the jax primitive computes: a swapped entry (Sub for
    Add, Greater for GreaterOrEqual, Max for Min, ...) fails here. Half the input equals the constant
    operand, so the comparisons see ties."""
    rng = np.random.default_rng(0)
    constant = rng.standard_normal((3, 4, 2)).astype(np.float32)
    x = rng.standard_normal((2, 3, 4, 2)).astype(np.float32)
    x[..., 0] = constant[..., 0]
    function = ELEMENTWISE_CASES[primitive]

    def apply(images):
        return function(images, jnp.broadcast_to(constant, images.shape))

    assert primitive in {e.primitive.name for e in jax.make_jaxpr(apply)(x).eqns}
    proto = onnx_graph.export_onnx(apply, jax.ShapeDtypeStruct(cbam_jax.artifacts.input_shape(3, 4, 2), jnp.float32))
    np.testing.assert_allclose(onnx_graph.run_onnx(proto, x), np.asarray(apply(x)), rtol=1e-6, atol=1e-6)


# ---- the other families: grouped (ResNeXt) and depthwise (MobileNet) convolutions ---------------------------

@pytest.mark.slow  # exports (and self-checks) twice per format, then compiles the artifacts: 10-30 s each
@pytest.mark.parametrize("name, overrides, config, groups", [
    # A CBAM-ResNeXt-50 shortened to two stages of one block: 3x3 convs of 32 and 64 channels in 32 groups.
    ("cbam_resnext50_32x4d", {"num_classes": 4, "width": 16, "stage_sizes": (1, 1)}, {"groups": 32}, {32}),
    # A headless CBAM-MobileNet (pooled features out): every unit's 3x3 conv is depthwise (8 to 256 channels).
    ("cbam_mobilenet_w1", {"num_classes": 0, "width": 8}, {"family": "mobilenet"}, {8, 16, 32, 64, 128, 256}),
])
def test_each_family_exports_its_grouped_convolutions(tmp_path, name, overrides, config, groups):
    import onnx

    stage_sizes = overrides.pop("stage_sizes", None)
    model = cbam_jax.create_model(name, reduction=4, **overrides)
    model = model.clone(stage_sizes=stage_sizes) if stage_sizes else model
    variables = random_variables(model, (1, 16, 16, 3))
    path = save_pretrained(tmp_path / "model", model, variables, metadata={"preprocessing": PREPROCESSING})
    out = tmp_path / "artifacts"
    assert cli.main(["export", str(path), str(out)]) == 0
    document = json.loads((out / "artifact.json").read_text())
    assert config.items() <= document["model"].items()
    exported = jax.export.deserialize(bytearray((out / "model.jax_export").read_bytes()))
    proto = (out / "model.onnx").read_bytes()
    convs = [n for n in onnx.load_from_string(proto).graph.node if n.op_type == "Conv"]
    assert {a.i for n in convs for a in n.attribute if a.name == "group" and a.i > 1} == groups
    for batch in (1, 3):
        images = _images(batch, 16, 16, seed=batch)
        expected = np.asarray(jax.jit(model.apply)(variables, images))
        assert document["output"]["shape"] == ["batch", expected.shape[-1]]
        assert _relative_error(exported.call(images), expected) <= 1e-5
        assert _relative_error(onnx_graph.run_onnx(proto, images), expected) <= 1e-4


@pytest.mark.slow  # compiles a CBAM detector and its decoding several times (~20 s)
def test_a_detector_exports_decoded_detections_and_its_dense_outputs_as_onnx(tmp_path, capsys):
    """A CBAM-ResNet FCOS: the StableHLO artifact returns the decoded detections, the ONNX graph the
    head's dense outputs, which onnxruntime computes within 1e-4 of the model and which
    `detections_from_dense` (artifact.json's points and decoding) turns into the same detections.
    """
    from cbam_jax.artifacts.detector import detections_from_dense
    from cbam_jax.detection.decode import detect
    from cbam_jax.detection.detector import create_detector
    from cbam_jax.detection.weights import save_detector

    size = 64
    detector = create_detector("cbam_resnet18", 3, width=8, fpn_channels=16, head_convs=1, head_norm_groups=8,
                               size_boundaries=(8.0, 16.0, 32.0, 64.0), backbone_options={"reduction": 4})
    variables = random_variables(detector, (1, size, size, 3))
    decoding = {"score_threshold": 0.05, "pre_nms_top_k": 50, "iou_threshold": 0.6, "max_detections": 8}
    save_detector(tmp_path / "det", detector, variables, {
        "class_names": ["a", "b", "c"], "decoding": decoding,
        "preprocessing": {"image_size": size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}})
    assert cli.main(["export", str(tmp_path / "det"), str(tmp_path / "out")]) == 0
    assert "decoded detections after NMS (StableHLO) / dense outputs (ONNX)" in capsys.readouterr().out
    document = json.loads((tmp_path / "out" / "artifact.json").read_text())
    assert document["files"] == {"stablehlo": "model.jax_export", "onnx": "model.onnx"}
    points, strides, _ = detector.points((size, size))
    assert len(document["points"]["xy"]) == len(document["points"]["strides"]) == points.shape[0] == 86
    assert document["onnx_outputs"]["class_logits"]["shape"] == ["batch", 86, 3]

    images = _images(3, size, size, seed=4)
    portable = detector.clone(backbone=detector.backbone.clone(implementation="xla"))
    dense = jax.jit(portable.apply)(variables, images)
    found = onnx_graph.run_onnx_outputs((tmp_path / "out" / "model.onnx").read_bytes(), images)
    for name, got, want in zip(("class_logits", "distances", "centerness_logits"), found, dense):
        assert got.shape == want.shape, name
        assert _relative_error(got, want) <= 1e-4, name
    exported = jax.export.deserialize(bytearray((tmp_path / "out" / "model.jax_export").read_bytes()))
    decoded = exported.call(images)
    from_onnx = detections_from_dense(found, tmp_path / "out")
    expected = detect(*dense, points, strides, (size, size), **decoding)
    assert int(np.sum(expected.valid)) > 3  # random weights still give detections to compare
    for result in (decoded, from_onnx._asdict()):
        np.testing.assert_array_equal(result["valid"], expected.valid)
        np.testing.assert_array_equal(result["classes"], expected.classes)
        np.testing.assert_allclose(result["boxes"], expected.boxes, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(result["scores"], expected.scores, rtol=1e-4, atol=1e-6)



def test_run_exported_on_an_onnx_only_artifact_says_what_to_run_instead(model_dir, tmp_path, capsys):
    from cbam_jax.artifacts import run_exported

    path, _, _ = model_dir
    assert cli.main(["export", str(path), str(tmp_path / "onnx_only"), "--formats", "onnx"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "onnx_only").iterdir()) == [
        "artifact.json", "model.onnx", "run_exported.py"]
    np.save(tmp_path / "images.npy", _images(1, 16, 16))
    assert run_exported.main([str(tmp_path / "onnx_only"), str(tmp_path / "images.npy")]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no StableHLO file" in error and "onnxruntime" in error, error
