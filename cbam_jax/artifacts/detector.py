"""`cbam-jax export` of a trained FCOS detector (a detection run's workdir or its `detector/` folder).

Both artifacts take preprocessed images (batch, S, S, 3) float32 NHWC (fitted into the S x S
canvas by their longer side, top-left, black padding; x / 255, (x - mean) / std).

- `model.jax_export` (StableHLO) returns the decoded detections, decoding and class-aware NMS
  included, as {'boxes' (batch, D, 4) float32 x0, y0, x1, y1 in input pixels, 'scores' (batch, D)
  float32, 'classes' (batch, D) int32, 'valid' (batch, D) bool}, D = max_detections, rows by
  decreasing score, `valid` marking the real ones (cbam_jax/detection/decode.py).
- `model.onnx` returns the head's dense outputs per point, before decoding: 'class_logits'
  (batch, N, K), 'distances' (batch, N, 4) (left, top, right, bottom in units of the point's
  stride) and 'centerness_logits' (batch, N). The NMS is a sequential loop over candidates
  (`lax.fori_loop`) and decoding uses top-k and sorts, which the op-by-op ONNX translation
  (onnx_graph.py) does not cover; artifact.json's `points` (x, y in input pixels, and the stride of
  each of the N points) and `decoding` say how to decode them, and `detections_from_dense` does it
  (giving the StableHLO artifact's detections).
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax import __version__
from cbam_jax.artifacts.check import check_close
from cbam_jax.artifacts.onnx_graph import export_onnx, run_onnx_outputs
from cbam_jax.artifacts.stablehlo import export_stablehlo
from cbam_jax.detection.decode import Detections, detect
from cbam_jax.detection.detector import FCOS, DenseOutputs, detector_config
from cbam_jax.detection.weights import load_detector
from cbam_jax.errors import ExportError

OUTPUTS = ("boxes", "scores", "classes", "valid")
DENSE_OUTPUTS = DenseOutputs._fields  # the ONNX graph's outputs, in order


def portable(detector: FCOS) -> FCOS:
    """The detector with XLA's own kernels and float32 compute (as the classifier's export)."""
    backbone = detector.backbone.clone(implementation="xla", dtype=jnp.float32)
    return detector.clone(backbone=backbone, dtype=jnp.float32)


def detection_function(detector: FCOS, variables: Any, size: int, decoding: dict):
    """Preprocessed images (B, S, S, 3) -> {'boxes', 'scores', 'classes', 'valid'} (B, D, ...)."""
    points, strides, _ = detector.points((size, size))

    def apply(images: jax.Array) -> dict[str, jax.Array]:
        found = detect(*detector.apply(variables, images), points, strides, (size, size), **decoding)
        return dict(zip(OUTPUTS, found))

    return apply


def check_detections(actual: dict, expected: dict, tolerance: float) -> None:
    """The artifact's detections against the model's: the same rows kept, classes equal, boxes and
    scores within `tolerance` x their scale."""
    if not np.array_equal(np.asarray(actual["valid"]), np.asarray(expected["valid"])) or \
            not np.array_equal(np.asarray(actual["classes"]), np.asarray(expected["classes"])):
        raise ExportError("the StableHLO artifact keeps other detections than the model; this is a bug in the "
                          "export, please report it.")
    for name in ("boxes", "scores"):
        check_close(f"StableHLO artifact's {name}", actual[name], expected[name], tolerance)


def check_dense(actual: list[np.ndarray], expected: DenseOutputs, tolerance: float) -> None:
    """The ONNX graph's dense outputs against the model's, within `tolerance` x each output's scale."""
    for name, found, want in zip(DENSE_OUTPUTS, actual, expected):
        check_close(f"ONNX artifact's {name}", found, want, tolerance)


def detections_from_dense(outputs: Sequence[Any] | Mapping[str, Any], artifact: Mapping[str, Any] | str | Path
                          ) -> Detections:
    """Decode the ONNX artifact's outputs into the StableHLO artifact's detections.

    Args:
      outputs: onnxruntime's outputs of `model.onnx`: [class_logits (B, N, K), distances (B, N, 4),
        centerness_logits (B, N)], or a dict by those names.
      artifact: the artifact directory, or its artifact.json as a dict.

    Returns:
      `Detections` (boxes (B, D, 4) in input pixels, scores (B, D), classes (B, D), valid (B, D)).
    """
    if not isinstance(artifact, Mapping):
        artifact = json.loads((Path(artifact) / "artifact.json").read_text())
    if isinstance(outputs, Mapping):
        outputs = [outputs[name] for name in DENSE_OUTPUTS]
    points = artifact["points"]
    size = tuple(int(d) for d in artifact["input"]["shape"][1:3])
    return jax.jit(lambda *dense: detect(*dense, jnp.asarray(points["xy"], jnp.float32),
                                         jnp.asarray(points["strides"], jnp.float32), size, **artifact["decoding"])
                   )(*[jnp.asarray(o, jnp.float32) for o in outputs])


def export_detector(directory: Path, staging: Path, *, formats: tuple[str, ...], height: int | None,
                    width: int | None, randomized, tolerances: dict[str, float], files: dict[str, str],
                    platforms: tuple[str, ...], format_version: int) -> dict[str, Any]:
    """Write the detector's artifacts (`formats`: 'stablehlo', 'onnx') into `staging`; returns the
    artifact.json document. `randomized(variables)`: the random-weights copy of the self-check
    (artifacts._randomized); `tolerances`: the self-check's, per format, relative to the output scale."""
    detector, variables, metadata = load_detector(directory)
    size = int(metadata["preprocessing"]["image_size"])
    if (height, width) not in ((None, None), (size, size)):
        raise ExportError(f"the detector's input is fixed at {size} x {size} (its points and decoding); leave out "
                          "--height/--width.")
    detector = portable(detector)
    decoding = dict(metadata["decoding"])
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("batch")[0], size, size, 3), jnp.float32)
    images = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    points, strides, _ = detector.points((size, size))
    rows = decoding["max_detections"]
    document = {
        "format_version": format_version,
        "task": "detection",
        "input": {"name": "images", "shape": ["batch", size, size, 3], "dtype": "float32", "layout": "NHWC",
                  "note": "preprocessed: fitted into the square by the longer side (top-left, black padding), "
                          "x / 255, (x - mean) / std per channel"},
        "preprocessing": metadata["preprocessing"],
        "decoding": decoding,
        "class_names": metadata.get("class_names"),
        "detector": detector_config(detector),
        "files": {name: files[name] for name in formats},
        "exported_with": {"cbam_jax": __version__, "jax": jax.__version__, "platforms": list(platforms),
                          "compute_dtype": "float32"},
    }
    if "stablehlo" in formats:
        document["output"] = {
            "boxes": {"shape": ["batch", rows, 4], "dtype": "float32", "note": "x0, y0, x1, y1 in input pixels"},
            "scores": {"shape": ["batch", rows], "dtype": "float32"},
            "classes": {"shape": ["batch", rows], "dtype": "int32"},
            "valid": {"shape": ["batch", rows], "dtype": "bool", "note": "True for real detections; rows by "
                                                                         "decreasing score"}}
    if "onnx" in formats:
        count, num_classes = int(points.shape[0]), detector.num_classes
        document["onnx_outputs"] = {
            "class_logits": {"shape": ["batch", count, num_classes], "dtype": "float32"},
            "distances": {"shape": ["batch", count, 4], "dtype": "float32",
                          "note": "left, top, right, bottom from the point, in units of its stride"},
            "centerness_logits": {"shape": ["batch", count], "dtype": "float32"}}
        document["points"] = {"xy": np.asarray(points).tolist(), "strides": np.asarray(strides).tolist(),
                              "note": "x, y in input pixels and the stride of each point, in the outputs' order"}
    # The model's own results, one compiled program for both weight sets.
    expected_detections = jax.jit(lambda w, x: detection_function(detector, w, size, decoding)(x))
    expected_dense = jax.jit(lambda w, x: tuple(detector.apply(w, x)))
    for index, weights in enumerate((variables, randomized(variables))):
        if "stablehlo" in formats:
            apply = detection_function(detector, weights, size, decoding)
            expected = jax.device_get(expected_detections(weights, images))
            data = export_stablehlo(apply, spec, platforms)
            if index == 0:
                (staging / files["stablehlo"]).write_bytes(data)
            check_detections(jax.device_get(jax.export.deserialize(bytearray(data)).call(images)), expected,
                             tolerances["stablehlo"])
        if "onnx" in formats:
            def dense(x, weights=weights):
                return tuple(detector.apply(weights, x))

            proto = export_onnx(dense, spec, output_names=DENSE_OUTPUTS,
                                metadata={"cbam_jax": json.dumps({k: v for k, v in document.items() if k != "points"},
                                                                 sort_keys=True)})
            if index == 0:
                (staging / files["onnx"]).write_bytes(proto)
            try:
                found = run_onnx_outputs(proto, images)
            except Exception as error:  # onnxruntime reports failures as its own exception types
                raise ExportError(f"onnxruntime cannot run the exported graph: {str(error).splitlines()[0]}") from None
            check_dense(found, jax.device_get(expected_dense(weights, images)), tolerances["onnx"])
    return document
