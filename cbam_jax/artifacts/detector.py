"""`cbam-jax export` of a trained FCOS detector (a detection run's workdir or its `detector/` folder).

The artifact is StableHLO only: `model.jax_export` takes preprocessed images (batch, S, S, 3)
float32 NHWC (fitted into the S x S canvas by their longer side, top-left, black padding; x / 255,
(x - mean) / std) and returns the decoded detections, decoding and class-aware NMS included, as
{'boxes' (batch, D, 4) float32 x0, y0, x1, y1 in input pixels, 'scores' (batch, D) float32,
'classes' (batch, D) int32, 'valid' (batch, D) bool}, D = max_detections, rows by decreasing
score, `valid` marking the real ones (cbam_jax/detection/decode.py). There is no ONNX artifact of
the detector: its NMS is a sequential loop over candidates (`lax.fori_loop`) and decoding uses
top-k and sorts, which the op-by-op ONNX translation (onnx_graph.py) does not cover.
"""

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax import __version__
from cbam_jax.artifacts.stablehlo import export_stablehlo
from cbam_jax.detection.decode import detect
from cbam_jax.detection.detector import FCOS, detector_config
from cbam_jax.detection.weights import load_detector
from cbam_jax.errors import ExportError

OUTPUTS = ("boxes", "scores", "classes", "valid")


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
        scale = max(1.0, float(np.max(np.abs(expected[name]))))
        error = float(np.max(np.abs(np.asarray(actual[name]) - np.asarray(expected[name]))))
        if not error <= tolerance * scale:
            raise ExportError(f"the StableHLO artifact's {name} differ from the model's by {error:.3g}; this is a "
                              "bug in the export, please report it.")


def export_detector(directory: Path, staging: Path, *, formats: tuple[str, ...], height: int | None,
                    width: int | None, randomized, tolerance: float, files: dict[str, str],
                    platforms: tuple[str, ...], format_version: int) -> dict[str, Any]:
    """Write the detector's StableHLO artifact into `staging`; returns the artifact.json document.
    `randomized(variables)`: the random-weights copy of the self-check (artifacts._randomized)."""
    if formats != ("stablehlo",):
        raise ExportError(f"{directory} is a detector: it exports as StableHLO only (its NMS loop has no ONNX "
                          "translation here); give --formats stablehlo.")
    detector, variables, metadata = load_detector(directory)
    size = int(metadata["preprocessing"]["image_size"])
    if (height, width) not in ((None, None), (size, size)):
        raise ExportError(f"the detector's input is fixed at {size} x {size} (its points and decoding); leave out "
                          "--height/--width.")
    detector = portable(detector)
    decoding = dict(metadata["decoding"])
    spec = jax.ShapeDtypeStruct((jax.export.symbolic_shape("batch")[0], size, size, 3), jnp.float32)
    images = np.random.default_rng(0).standard_normal((2, size, size, 3)).astype(np.float32)
    for index, weights in enumerate((variables, randomized(variables))):
        apply = detection_function(detector, weights, size, decoding)
        expected = jax.device_get(jax.jit(apply)(images))
        data = export_stablehlo(apply, spec, platforms)
        if index == 0:
            (staging / files["stablehlo"]).write_bytes(data)
        check_detections(jax.device_get(jax.export.deserialize(bytearray(data)).call(images)), expected, tolerance)
    rows = decoding["max_detections"]
    return {
        "format_version": format_version,
        "task": "detection",
        "input": {"name": "images", "shape": ["batch", size, size, 3], "dtype": "float32", "layout": "NHWC",
                  "note": "preprocessed: fitted into the square by the longer side (top-left, black padding), "
                          "x / 255, (x - mean) / std per channel"},
        "output": {"boxes": {"shape": ["batch", rows, 4], "dtype": "float32", "note": "x0, y0, x1, y1 in input pixels"},
                   "scores": {"shape": ["batch", rows], "dtype": "float32"},
                   "classes": {"shape": ["batch", rows], "dtype": "int32"},
                   "valid": {"shape": ["batch", rows], "dtype": "bool",
                             "note": "True for real detections; rows by decreasing score"}},
        "preprocessing": metadata["preprocessing"],
        "decoding": decoding,
        "class_names": metadata.get("class_names"),
        "detector": detector_config(detector),
        "files": {"stablehlo": files["stablehlo"]},
        "exported_with": {"cbam_jax": __version__, "jax": jax.__version__, "platforms": list(platforms),
                          "compute_dtype": "float32"},
    }
