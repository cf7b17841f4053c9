"""Pretrained-model folders: `save_pretrained(path, model, variables)` / `load_pretrained(path)`.

One format, on disk and on the Hugging Face Hub (`cbam_jax.hub` fetches Hub repositories into such
folders), written by `save_pretrained`, `cbam-jax convert`, the zoo's cache and training's export:

    path/
      config.json        {"library_name": "cbam-jax", "format_version": 1, "model": registry.model_config(model),
                          "metadata": {...}, "weights_sha256": HEX}
      model.safetensors  every variable under its Flax path ('params/layer1_0/conv1/kernel'); no pickle
      README.md          the model card: architecture, parameters, reported accuracy, preprocessing, usage

`weights_sha256` is the SHA-256 of model.safetensors, checked on every load: a damaged file is
refused (`DamagedWeights`), never used.

Metadata conventions (all optional): "class_names": list[str]; "preprocessing": {"resize": 256,
"crop": 224, "mean": [...], "std": [...]} (absent or None when unknown; "resize" may also be a
[height, width] pair: resize to exactly that size; "channels": 1 for greyscale models, default 3,
with one mean/std per channel); "source": where the weights came from (e.g. the converter records
the PyTorch file and its layout; training exports record the workdir); "metrics": reported accuracy.

Also read: a folder of PyTorch weights as `model.safetensors` with another library's config.json
(timm's Hub repositories: converted as `cbam_jax.convert.from_torch` does; timm's `pretrained_cfg`
gives the preprocessing), and, until the next minor version, the old orbax folders (`cbam_jax.json`
+ `variables/`) with a FutureWarning saying how to convert them.
"""

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from cbam_jax import registry
from cbam_jax.atomic import OutputExists, atomic_output
from cbam_jax.checks import COLLECTIONS, NonFiniteWeights, check_finite, check_matches_model
from cbam_jax.convert import from_torch
from cbam_jax.errors import InvalidInput, MissingInput
from cbam_jax.resnet import ResNet

__all__ = ["CARD_FILE", "CONFIG_FILE", "FORMAT_VERSION", "IMAGENET_PREPROCESSING", "LIBRARY_NAME", "WEIGHTS_FILE",
           "DamagedWeights", "NonFiniteWeights", "check_finite", "is_pretrained_folder", "load_metadata",
           "load_pretrained", "model_card", "save_pretrained"]

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
LIBRARY_NAME = "cbam-jax"
DIGEST_KEY = "weights_sha256"
# The orbax format of cbam-jax 0.1 (read until the next minor version).
LEGACY_CONFIG_FILE = "cbam_jax.json"
LEGACY_VARIABLES_DIR = "variables"
VARIABLES_DIR = LEGACY_VARIABLES_DIR  # the name cbam-jax 0.1 callers import
# ImageNet evaluation preprocessing of the official checkpoints: resize the short side to 256,
# center-crop 224, scale to [0, 1], normalise per RGB channel.
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGENET_PREPROCESSING: dict[str, Any] = {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}


class DamagedWeights(InvalidInput):
    """A pretrained folder whose model.safetensors is not the file its config.json recorded."""


def save_pretrained(path: str | os.PathLike, model: ResNet, variables: Mapping[str, Any], *,
                    metadata: dict[str, Any] | None = None, overwrite: bool = False, hub: bool = False) -> Path:
    """Write `model` and its `variables` ('params' and, if any, 'batch_stats') to the folder `path`:
    model.safetensors, config.json and a model card (see the module docstring).

    The folder appears complete or not at all (`cbam_jax.atomic.atomic_output`): it is written
    under a temporary name beside `path` and renamed at the end.

    Args:
      path: the folder to create.
      model: the `ResNet` the variables belong to (its config goes to config.json).
      variables: `model.init(...)`-style variables; collections other than params/batch_stats
        (e.g. 'intermediates') are not saved.
      metadata: JSON-serialisable extras (see the module docstring for the conventions).
      overwrite: replace an existing `path` (readers see the old folder or the new one, never a
        mix); by default an existing `path` is an error and nothing is overwritten.
      hub: accepted for compatibility; every folder is Hub-ready (`cbam_jax.hub.push_to_hub`).

    Returns:
      The folder as a Path.
    """
    del hub  # one format: the Hub folder is the pretrained folder
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise OutputExists(f"save_pretrained: {path} already exists; choose a new path or remove it first.")
    if "params" not in variables:
        raise ValueError(f"save_pretrained: variables must contain 'params'; got collections {sorted(variables)}.")
    arrays = weight_arrays(variables)
    try:
        json.dumps(metadata or {})
    except TypeError as error:
        raise ValueError(f"save_pretrained: metadata must be JSON-serialisable ({error}).") from None
    card = model_card(model, arrays, metadata or {})
    with atomic_output(path, folder=True, replace=overwrite) as staging:
        document = {"library_name": LIBRARY_NAME, "format_version": FORMAT_VERSION,
                    "model": registry.model_config(model), "metadata": metadata or {},
                    DIGEST_KEY: write_weights(staging, arrays)}
        (staging / CONFIG_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        (staging / CARD_FILE).write_text(card)
    return path


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder this module reads (model.safetensors, or the old cbam_jax.json)."""
    path = Path(path)
    return path.is_dir() and ((path / WEIGHTS_FILE).is_file() or (path / LEGACY_CONFIG_FILE).is_file())


def load_pretrained(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild `(model, variables)` from a pretrained folder (see the module docstring).

    `variables` is {'params': ..., 'batch_stats': ...} of jax arrays, ready for
    `model.apply(variables, x)` with x of shape (B, H, W, C). (`cbam_jax.load_pretrained` also takes
    'hf-hub:ORG/NAME' ids.)

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: `path` is not a pretrained folder, its files are damaged (`DamagedWeights`) or do
        not match the model they describe, or its weights are not finite (`NonFiniteWeights`, unless
        `allow_nonfinite`).
    """
    path = Path(path).absolute()
    document = _read_document(path)
    if document is None:  # PyTorch weights in safetensors (timm and others)
        model, variables = from_torch(path / WEIGHTS_FILE, allow_nonfinite=allow_nonfinite)
        return model, variables
    try:
        model = registry.model_from_config(document["model"])
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"load_pretrained: {path} describes an invalid model: {error}") from None
    if document.get("legacy"):
        variables = _read_legacy_variables(path)
    else:
        variables = read_weights(path, document)
    check_matches_model(f"load_pretrained: {path}", model, variables)
    if not allow_nonfinite:
        check_finite(variables, str(path))
    return model, jax.tree.map(jax.numpy.asarray, variables)


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata saved with the pretrained folder `path` ({} if none was given); for a timm-style
    folder, the preprocessing its `pretrained_cfg` describes."""
    path = Path(path).absolute()
    document = _read_document(path)
    if document is None:
        return _foreign_metadata(path)
    return dict(document.get("metadata") or {})


def _read_document(path: Path) -> dict[str, Any] | None:
    """config.json (or the old cbam_jax.json, marked 'legacy') checked; None for a foreign config
    (PyTorch weights in model.safetensors)."""
    if not path.exists():
        raise MissingInput(f"No pretrained model at {path}: the folder does not exist.")
    if path.is_dir() and (path / LEGACY_CONFIG_FILE).is_file() and not (path / WEIGHTS_FILE).is_file():
        return _read_legacy_document(path)
    if not path.is_dir() or not (path / WEIGHTS_FILE).is_file():
        raise InvalidInput(f"{path} is not a cbam-jax pretrained folder (no {WEIGHTS_FILE}); create one with "
                           "cbam_jax.save_pretrained or `cbam-jax convert`.")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        return None
    document = _read_json(config_file)
    if not isinstance(document, dict) or document.get("library_name") != LIBRARY_NAME:
        return None  # another library's config (e.g. timm's): the weights are PyTorch's
    if document.get("format_version") != FORMAT_VERSION or not isinstance(document.get("model"), dict):
        raise InvalidInput(f"{config_file} has format_version {document.get('format_version')!r} or no model; "
                           f"this cbam-jax reads format_version {FORMAT_VERSION}.")
    return document


def _read_json(config_file: Path) -> Any:
    try:
        return json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(f"{config_file} is corrupt (not valid JSON): {error}") from None


def weight_arrays(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The 'params' and 'batch_stats' of `variables` as flat NumPy arrays keyed by their Flax paths."""
    tree = {c: unfreeze(variables[c]) for c in COLLECTIONS if c in variables}
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (scalar parameters) into shape (1,)
    return {key: np.array(value, order="C") for key, value in flatten_dict(tree, sep="/").items()}


def write_weights(folder: Path, arrays: Mapping[str, np.ndarray]) -> str:
    """Write `arrays` (`weight_arrays`) as folder/model.safetensors; returns its SHA-256 for config.json.

    One metadata key: safetensors writes several in a random order, and the same weights must give
    the same file (and digest). Written with open() (safetensors' save_file makes 0o600 files, not
    the user's umask)."""
    (folder / WEIGHTS_FILE).write_bytes(save(dict(arrays), metadata={"format": "flax"}))
    return _sha256(folder / WEIGHTS_FILE)


def read_weights(path: Path, document: dict[str, Any]) -> dict[str, Any]:
    """The variables in path/model.safetensors, checked against the SHA-256 that `document` (the
    folder's config.json) recorded; DamagedWeights or InvalidInput (one line) otherwise."""
    weights = path / WEIGHTS_FILE
    recorded = document.get(DIGEST_KEY)
    if recorded is not None and _sha256(weights) != recorded:
        raise DamagedWeights(f"{weights} is damaged: its SHA-256 is not the {recorded[:16]}... recorded in "
                             f"{CONFIG_FILE}; fetch or convert the model again.")
    try:
        arrays = load_file(weights)
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidInput(f"{weights} is unreadable (truncated?): {error}") from None
    if not arrays or not all(key.split("/")[0] in COLLECTIONS for key in arrays):
        raise InvalidInput(f"{weights} does not hold cbam-jax variables (keys like 'params/conv1/kernel').")
    return unflatten_dict(arrays, sep="/")


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _foreign_metadata(path: Path) -> dict[str, Any]:
    """Metadata of a PyTorch safetensors folder: timm's `pretrained_cfg` as preprocessing, if there."""
    config_file = path / CONFIG_FILE
    document = _read_json(config_file) if config_file.is_file() else None
    cfg = document.get("pretrained_cfg") if isinstance(document, dict) else None
    if not isinstance(cfg, dict):
        return {}
    metadata: dict[str, Any] = {"source": {"library": "timm", "architecture": document.get("architecture")}}
    input_size, crop_pct = cfg.get("input_size"), cfg.get("crop_pct")
    if isinstance(input_size, list) and len(input_size) == 3 and isinstance(crop_pct, int | float) and crop_pct > 0:
        channels, height, width = input_size
        # timm's eval transform: resize the short side to floor(size / crop_pct), center-crop size.
        metadata["preprocessing"] = {"resize": int(min(height, width) / crop_pct), "crop": min(height, width),
                                     "mean": list(cfg.get("mean", IMAGENET_MEAN)), "std": list(cfg.get("std", IMAGENET_STD)),
                                     "channels": channels, "interpolation": cfg.get("interpolation", "bilinear")}
    if isinstance(document.get("label_names"), list):
        metadata["class_names"] = list(document["label_names"])
    return metadata


# ---- the orbax format of cbam-jax 0.1 ----------------------------------------------------------------------------

def _read_legacy_document(path: Path) -> dict[str, Any]:
    config_file = path / LEGACY_CONFIG_FILE
    document = _read_json(config_file)
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise InvalidInput(f"{config_file} is not a cbam-jax model file: no 'model' config object.")
    if document.get("format_version") != 1:
        raise InvalidInput(f"{config_file} has format_version {document.get('format_version')!r}; "
                           "this version of cbam-jax reads format_version 1.")
    warnings.warn(f"{path} is in the old orbax format ({LEGACY_CONFIG_FILE} + {LEGACY_VARIABLES_DIR}/), read until "
                  f"the next minor version; convert it with cbam_jax.save_pretrained(new_path, "
                  f"*cbam_jax.load_pretrained(old_path)).", FutureWarning, stacklevel=4)
    return {**document, "legacy": True, "metadata": document.get("metadata") or {}}


def _read_legacy_variables(path: Path) -> dict[str, Any]:
    variables_dir = path / LEGACY_VARIABLES_DIR
    if not variables_dir.is_dir():
        raise InvalidInput(f"load_pretrained: {path} has no '{LEGACY_VARIABLES_DIR}/' checkpoint; the folder is "
                           "incomplete.")
    try:
        restored = process_local_checkpointer().restore(variables_dir)
    except Exception as error:  # orbax raises many kinds of errors for damaged files
        raise InvalidInput(f"load_pretrained: cannot read the checkpoint in {variables_dir} "
                           f"(corrupt or incomplete?): {type(error).__name__}: {error}") from None
    return {name: jax.tree.map(np.asarray, unfreeze(restored[name])) for name in COLLECTIONS if name in restored}


def process_local_checkpointer(handler: type = ocp.PyTreeCheckpointHandler) -> ocp.Checkpointer:
    """A checkpointer (of arrays, or of `handler`'s items, e.g. ocp.JsonCheckpointHandler) that reads
    and writes from the calling process alone: in a multi-process run (e.g. process 0 exporting at
    the end of training) the default one would wait for the others."""
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})
    return ocp.Checkpointer(handler(multiprocessing_options=alone), multiprocessing_options=alone)


# ---- the model card ----------------------------------------------------------------------------------------------

def model_card(model: ResNet, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> str:
    """The README.md of a pretrained folder (and Hub repository): YAML front matter and the model's numbers."""
    num_params = sum(int(np.prod(v.shape)) for k, v in arrays.items() if k.startswith("params/"))
    # Metadata is free-form (training's export records its workdir as "source"): only mappings are read.
    source, metrics, preprocessing = (value if isinstance(value, Mapping) else {} for value in
                                      (metadata.get("source"), metadata.get("metrics"), metadata.get("preprocessing")))
    name = source.get("name") or _arch_name(model)
    license_id = str(source.get("license", "")).lower()
    front = ["---", f"library_name: {LIBRARY_NAME}", "pipeline_tag: image-classification",
             "tags: [image-classification, jax, flax, cbam, resnet]"]
    if license_id:
        front.append(f"license: {license_id}")
    rows = [("architecture", f"{_arch_name(model)} (attention {model.attention or 'none'}, stem {model.stem})"),
            ("parameters", f"{num_params:,}"),
            ("output", "feature maps " + ", ".join(f"{f.channels} ch / stride {f.reduction}" for f in model.feature_info)
             if model.features_only else f"{model.num_classes} classes" if model.num_classes else "pooled features")]
    for key in ("top1", "top5"):
        if metrics.get(key) is not None:
            rows.append((f"{key[:3]}-{key[3:]} accuracy", f"{metrics[key]}% ({metrics.get('dataset', '')}, "
                                                           f"reported by {metrics.get('reported_by', 'the publisher')})"))
    if preprocessing:
        rows.append(("eval preprocessing", ", ".join(f"{k} {v}" for k, v in preprocessing.items())))
    for key in ("url", "checksum", "sha256", "layout", "license"):
        if source.get(key):
            rows.append((f"source {key}", str(source[key])))
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    usage = ("```python\nimport cbam_jax\n\nmodel, variables = cbam_jax.load_pretrained(\"hf-hub:ORG/NAME\")\n"
             "logits = model.apply(variables, images)  # images: (B, H, W, 3) float32, preprocessed as above\n```")
    return (f"{chr(10).join(front)}\n---\n\n# {name}\n\nA {_arch_name(model)} for cbam-jax (CBAM-ResNets in "
            f"JAX/Flax), stored as safetensors.\n\n{table}\n\n## Use\n\n{usage}\n")


def _arch_name(model: ResNet) -> str:
    try:
        arch, overrides = registry.architecture_of(model)
    except InvalidInput:  # stages no registered name has
        return f"{type(model).__name__} (stages {list(getattr(model, 'stage_sizes', []))})"
    prefix = next(p for p, kind in registry.PREFIXES.items() if kind == model.attention)
    return f"{prefix}{arch}" + (f" ({', '.join(f'{k}={v}' for k, v in overrides.items())})" if overrides else "")