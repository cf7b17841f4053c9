"""Trained detectors on disk: `save_detector(path, detector, variables, metadata)` / `load_detector(path)`.

The layout of a pretrained folder (cbam_jax/pretrained.py), with a 'detector' config instead of a
'model' one:

    path/
      model.safetensors  every variable under its Flax path ('params/backbone/conv1/kernel')
      config.json        {"format_version": 1, "detector": detector_config(detector), "metadata": {...},
                          "weights_sha256": SHA-256 of model.safetensors, checked on every load}

Metadata: "class_names", "preprocessing" {"image_size", "mean", "std"}, "decoding" (score_threshold,
pre_nms_top_k, iou_threshold, max_detections), "source".
"""

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cbam_jax.atomic import atomic_output
from cbam_jax.detection.detector import FCOS, detector_config, detector_from_config
from cbam_jax.errors import InvalidInput, MissingInput
from cbam_jax.pretrained import (CONFIG_FILE, DIGEST_KEY, FORMAT_VERSION, LIBRARY_NAME, check_finite, read_weights,
                                 weight_arrays, write_weights)

EXPORT_DIR = "detector"  # the folder a finished training run exports into its workdir


def save_detector(path: str | os.PathLike, detector: FCOS, variables: dict, metadata: dict[str, Any],
                  overwrite: bool = False) -> Path:
    """Write the directory `path` atomically (whole or not at all)."""
    arrays = weight_arrays(variables)
    with atomic_output(path, folder=True, replace=overwrite) as staging:
        document = {"library_name": LIBRARY_NAME, "format_version": FORMAT_VERSION,
                    "detector": detector_config(detector), "metadata": metadata, DIGEST_KEY: write_weights(staging, arrays)}
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    return Path(path).absolute()


def find_detector(path: str | os.PathLike) -> Path:
    """The detector directory of `path`: `path` itself, or the export of a training workdir (path/detector)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"--pretrained {path}: no such file or directory.")
    for candidate in (path, path / EXPORT_DIR):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise InvalidInput(f"--pretrained {path}: not a detector directory or a finished detection run (expected "
                       f"{path / CONFIG_FILE} or {path / EXPORT_DIR / CONFIG_FILE}); train one with "
                       "`python train.py --config configs/detection_shapes.py --workdir runs/NAME`.")


def detector_directory(path: str | os.PathLike) -> Path | None:
    """The detector folder of `path` (itself, or a detection workdir's `detector/`); None when `path`
    holds no detector (a classifier's folder, a registered name, a missing path, an unreadable
    config.json: the classifier's loader reports those)."""
    path = Path(path)
    if (path / EXPORT_DIR / CONFIG_FILE).is_file():
        return path / EXPORT_DIR
    try:
        document = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    return path if isinstance(document, dict) and "detector" in document else None


def load_detector(path: str | os.PathLike) -> tuple[FCOS, dict, dict[str, Any]]:
    """(detector, variables, metadata) from a detector directory or a finished training workdir."""
    directory = find_detector(path)
    try:
        document = json.loads((directory / CONFIG_FILE).read_text())
    except ValueError as error:
        raise InvalidInput(f"{directory / CONFIG_FILE} is corrupt (not valid JSON: {error}); export the detector "
                           "again (a finished run writes WORKDIR/detector).") from None
    try:
        detector = detector_from_config(document["detector"])
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidInput(f"{directory / CONFIG_FILE}: not a detector description ({error}).") from None
    restored = read_weights(directory, document)
    variables = {name: jax.tree.map(jax.numpy.asarray, restored[name]) for name in ("params", "batch_stats")
                 if name in restored}
    check_finite(variables, str(directory))
    return detector, variables, document.get("metadata", {})
