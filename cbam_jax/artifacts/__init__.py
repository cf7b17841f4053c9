"""Portable inference artifacts of a pretrained model: `cbam-jax export MODEL_DIR OUT`.

OUT (a new directory, written completely or not at all) holds (a trained detector's artifacts,
its decoded detections in StableHLO and its dense outputs in ONNX, are described in
artifacts/detector.py):

    artifact.json      input spec, preprocessing, class names, model config, versions, file names
    model.jax_export   `jax.export` serialized StableHLO (weights inside), symbolic batch; runs
                       with jax alone: `jax.export.deserialize(bytearray(data)).call(images)`
    model.onnx         the same network as an ONNX graph (batch dimension 'batch'); the metadata
                       is in its metadata_props['cbam_jax']
    run_exported.py    a script that needs only jax (and numpy): top-k classes of .npy images

Both take float32 NHWC images already preprocessed as the metadata says (resize, crop, scale to
[0, 1], subtract mean, divide by std per channel) and return float32 logits (B, num_classes), or
the pooled features when the model has no head. They are exported from the model's inference
path (`model.apply(variables, x)`, running statistics) with `implementation='xla'`: XLA's own
convolution, BatchNorm and max pool, no CPU-fast-path optimisation barriers or custom gradients,
so the graph runs on any backend (the StableHLO is lowered for cpu, cuda and tpu). Computation is
float32, also for models trained with bfloat16 compute.
"""

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbam_jax import __version__
from cbam_jax.artifacts import onnx_graph
from cbam_jax.artifacts.check import check_close
from cbam_jax.artifacts.detector import export_detector
from cbam_jax.artifacts.stablehlo import export_stablehlo, run_stablehlo
from cbam_jax.atomic import atomic_output, check_destination
from cbam_jax.detection.weights import detector_directory
from cbam_jax.errors import ExportError, UserError, one_line, require
from cbam_jax.factory import load_with_metadata
from cbam_jax.registry import model_config

FORMAT_VERSION = 1
METADATA_FILE = "artifact.json"
STABLEHLO_FILE = "model.jax_export"
ONNX_FILE = "model.onnx"
SCRIPT_FILE = "run_exported.py"
FORMATS = ("stablehlo", "onnx")
# The StableHLO artifact is lowered for these platforms (one module, dispatched at run time).
PLATFORMS = ("cpu", "cuda", "tpu")
# Export-time self-check: the artifact against the model on one random batch, with the real weights
# and with a randomised copy of them (see `_randomized`). Tolerances are relative to the logit scale
# (max |logit|, at least 1): float32 rounding grows with the values, so a fixed absolute bound would
# refuse a correct export of a model with large logits.
STABLEHLO_CHECK_TOLERANCE = 1e-5
ONNX_CHECK_TOLERANCE = 1e-4


def input_shape(height: int | None, width: int | None, channels: int) -> tuple:
    """The exported input shape: symbolic batch, and symbolic height and width when they are None."""
    names = "batch" if height is not None else "batch, height, width"
    dims = jax.export.symbolic_shape(names)
    if height is None:
        return (*dims, channels)
    return (dims[0], height, width, channels)


def export_artifacts(model_dir: str | os.PathLike, out: str | os.PathLike, *, height: int | None = None,
                     width: int | None = None, dynamic_size: bool = False,
                     formats: Sequence[str] | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Export the pretrained model in `model_dir` to the new directory `out`; returns the metadata written.

    Args:
      model_dir: a `save_pretrained` / `cbam-jax convert` / training `pretrained/` directory, a registered
        name (`cbam-jax list-pretrained`) or an 'hf-hub:ORG/NAME[@REV]' id.
      out: the directory to create (must not exist).
      height, width: the fixed input size (default: the metadata's preprocessing crop).
      dynamic_size: symbolic height and width too (StableHLO only).
      formats: any of 'stablehlo', 'onnx' (default: both; a detector's, see artifacts/detector.py).
      allow_nonfinite: export weights holding NaN or inf (refused by default).

    Raises:
      ExportError: a bad argument or a case the exporters cannot take (nothing is written).
      FileNotFoundError / ValueError: `model_dir` is not a pretrained model directory.
      OutputError: `out` cannot be written there (nothing is written).
    """
    out = Path(out).absolute()
    detector = detector_directory(model_dir)
    formats = tuple(dict.fromkeys(formats if formats is not None else FORMATS))
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ExportError(f"unknown format(s) {unknown or formats}; choose from {list(FORMATS)}.")
    check_destination(out)
    if "stablehlo" in formats:
        require("flatbuffers", "export")  # jax.export's serialisation
    if "onnx" in formats:
        onnx_graph.require_onnx()  # fails early with the install hint when onnx is missing
    if detector is not None:  # a trained FCOS: decoded detections (StableHLO), dense outputs (ONNX)
        if dynamic_size:
            raise ExportError("the detector's input size is fixed (its points and decoding); drop --dynamic-size.")
        with atomic_output(out, folder=True) as staging:
            document = export_detector(detector, staging, formats=formats, height=height, width=width,
                                       randomized=_randomized,
                                       tolerances={"stablehlo": STABLEHLO_CHECK_TOLERANCE, "onnx": ONNX_CHECK_TOLERANCE},
                                       files={"stablehlo": STABLEHLO_FILE, "onnx": ONNX_FILE}, platforms=PLATFORMS,
                                       format_version=FORMAT_VERSION)
            (staging / METADATA_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
            shutil.copyfile(Path(__file__).with_name(SCRIPT_FILE), staging / SCRIPT_FILE)
        return document
    if "onnx" in formats:
        if dynamic_size:
            raise ExportError("the ONNX export takes a symbolic batch only, not a symbolic height and width; "
                              "drop --dynamic-size, or export --formats stablehlo.")
    model, variables, metadata = load_with_metadata(model_dir, allow_nonfinite=allow_nonfinite)
    if getattr(model, "features_only", False):
        raise ExportError(f"{model_dir} is a features_only backbone (a list of feature maps, not logits); the "
                          "artifact's contract is images -> logits: export the full model.")
    channels = int(np.shape(variables["params"]["conv1"]["kernel"])[2])
    if dynamic_size:
        if height is not None or width is not None:
            raise ExportError("give either --dynamic-size or --height/--width, not both.")
    else:
        height, width = _fixed_size(height, width, metadata.get("preprocessing"))
    # XLA's own kernels (portable graph) and float32 compute (a bfloat16-trained model's float32
    # parameters; bfloat16 convolutions are not available in every runtime, e.g. onnxruntime's CPU).
    model = model.clone(implementation="xla", dtype=jnp.float32)

    def applying(weights: Any):
        return lambda images: model.apply(weights, images)

    apply = applying(variables)
    spec = jax.ShapeDtypeStruct(input_shape(height, width, channels), jnp.float32)
    document = _document(model, metadata, channels, height, width, formats)
    check_images = np.random.default_rng(0).standard_normal((2, height or 37, width or 29, channels)).astype(np.float32)
    # The real weights may leave parts of the network without effect on the output (a freshly
    # initialised spatial gate is a constant 0.5): the randomised copy makes every op count.
    checks = [(f, np.asarray(jax.jit(f)(check_images))) for f in (apply, applying(_randomized(variables)))]
    with atomic_output(out, folder=True) as staging:  # OUT appears complete or not at all
        if "stablehlo" in formats:
            for index, (f, expected) in enumerate(checks):
                data = export_stablehlo(f, spec, PLATFORMS)
                if index == 0:
                    (staging / STABLEHLO_FILE).write_bytes(data)
                check_close("StableHLO artifact's output", run_stablehlo(data, check_images), expected,
                            STABLEHLO_CHECK_TOLERANCE)
        if "onnx" in formats:
            for index, (f, expected) in enumerate(checks):
                proto = onnx_graph.export_onnx(f, spec, metadata={"cbam_jax": json.dumps(document, sort_keys=True)})
                if index == 0:
                    (staging / ONNX_FILE).write_bytes(proto)
                try:
                    outputs = onnx_graph.run_onnx(proto, check_images)
                except Exception as error:  # onnxruntime reports failures as its own exception types
                    raise ExportError("onnxruntime cannot run the exported graph: "
                                      f"{str(error).splitlines()[0]}") from None
                check_close("ONNX artifact's output", outputs, expected, ONNX_CHECK_TOLERANCE)
        (staging / METADATA_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(Path(__file__).with_name(SCRIPT_FILE), staging / SCRIPT_FILE)
    return document


def _fixed_size(height: int | None, width: int | None, preprocessing: dict | None) -> tuple[int, int]:
    """--height/--width, else the preprocessing's crop (or its [height, width] resize without crop)."""
    if (height is None) != (width is None):
        raise ExportError("give both --height and --width (or neither, for the preprocessing's crop).")
    if height is None and width is None and preprocessing:
        crop, resize = preprocessing.get("crop"), preprocessing.get("resize")
        if isinstance(crop, int):
            height = width = crop
        elif isinstance(resize, list | tuple) and len(resize) == 2:
            height, width = resize
    if height is None or width is None:
        raise ExportError("the input size is unknown (the model's metadata has no preprocessing crop); give "
                          "--height and --width, or --dynamic-size.")
    if not all(isinstance(v, int) and v >= 1 for v in (height, width)):
        raise ExportError(f"the input size must be positive integers; got height={height!r}, width={width!r}.")
    return height, width


def _document(model, metadata: dict, channels: int, height: int | None, width: int | None,
              formats: Sequence[str]) -> dict[str, Any]:
    # Headless: the pooled output of the last stage, whatever the family and its widths.
    outputs = model.num_classes or model.clone(out_indices=None).feature_info[-1].channels
    files = {"stablehlo": STABLEHLO_FILE, "onnx": ONNX_FILE}
    return {
        "format_version": FORMAT_VERSION,
        "input": {"name": "images", "shape": ["batch", height or "height", width or "width", channels],
                  "dtype": "float32", "layout": "NHWC",
                  "note": "preprocessed: resize, crop, x / 255, (x - mean) / std per channel"},
        "output": {"name": "logits" if model.num_classes else "features", "shape": ["batch", outputs],
                   "dtype": "float32"},
        "preprocessing": metadata.get("preprocessing"),
        "class_names": metadata.get("class_names"),
        "model": model_config(model),
        "files": {name: files[name] for name in formats},
        "exported_with": {"cbam_jax": __version__, "jax": jax.__version__, "platforms": list(PLATFORMS),
                          "compute_dtype": "float32"},
    }


def _randomized(variables: Any, seed: int = 0) -> Any:
    """A copy of `variables` with every leaf random at a scale that keeps activations O(1) through a
    deep network: kernels N(0, 1/fan_in), BatchNorm scales and variances U(0.5, 1.5), biases and
    means N(0, 0.1). No leaf sits at a special value (a zero BatchNorm scale, a zero bias) that
    would hide an op of the graph from the self-check."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        shape, name = np.shape(leaf), getattr(path[-1], "key", "")
        if name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        else:
            value = 0.1 * rng.standard_normal(shape)
        return jnp.asarray(value, dtype=jnp.asarray(leaf).dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL", help="a pretrained model directory (cbam-jax convert, "
                        "save_pretrained, or a training run's WORKDIR/pretrained), a registered name "
                        "(`cbam-jax list-pretrained`) or an hf-hub:ORG/NAME[@REV] id")
    parser.add_argument("out", metavar="OUT", help="the directory to create for the artifacts")
    parser.add_argument("--height", type=int, help="input height (default: the preprocessing crop)")
    parser.add_argument("--width", type=int, help="input width (default: the preprocessing crop)")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="symbolic height and width as well as batch (StableHLO only)")
    parser.add_argument("--formats", help=f"comma-separated, from {', '.join(FORMATS)} (default: both; a detector's ONNX "
                        "graph returns its dense outputs, before decoding)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="export weights holding NaN or inf (refused by default: such weights are broken)")


def run(args: argparse.Namespace) -> int:
    """Export; print the files written, or a UserError (one line, exit code 1, nothing written)."""
    formats = None if args.formats is None else [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        document = export_artifacts(args.model_dir, args.out, height=args.height, width=args.width,
                                    dynamic_size=args.dynamic_size, formats=formats,
                                    allow_nonfinite=args.allow_nonfinite)
    except UserError as error:
        if hasattr(error, "for_option"):  # NaN/inf weights: name the option that lets them through
            error = error.for_option("--allow-nonfinite")
        raise UserError(f"{one_line(error)} Nothing was written to {args.out}.", exit_code=error.exit_code) from None
    shape = "x".join(str(d) for d in document["input"]["shape"])
    returns = ""
    if document.get("task") == "detection":
        returns = " -> " + " / ".join(what for key, what in (("stablehlo", "decoded detections after NMS (StableHLO)"),
                                                             ("onnx", "dense outputs (ONNX)")) if key in document["files"])
    print(f"Exported {args.model_dir} -> {args.out}: {', '.join(document['files'].values())} "
          f"(input {shape} float32 NHWC{returns}), {METADATA_FILE}, {SCRIPT_FILE}.")
    return 0
