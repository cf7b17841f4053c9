"""Pretrained-model directories: `save_pretrained(path, model, variables)` / `load_pretrained(path)`.

A directory holds everything needed to rebuild a model, and nothing else:

    path/
      cbam_jax.json   {"format_version": 1, "model": registry.model_config(model), "metadata": {...}}
      variables/      an orbax checkpoint of {"params": ..., "batch_stats": ...}

Metadata conventions (all optional): "class_names": list[str]; "preprocessing": {"resize": 256,
"crop": 224, "mean": [...], "std": [...]} (absent or None when unknown; "resize" may also be a
[height, width] pair: resize to exactly that size; "channels": 1 for greyscale models, default 3,
with one mean/std per channel); "source": where the weights came from (e.g. the converter records
the PyTorch file and its layout; training exports record the workdir).
"""

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.core import unfreeze

from cbam_jax import registry
from cbam_jax.atomic import OutputExists, atomic_output
from cbam_jax.errors import InvalidInput, MissingInput
from cbam_jax.resnet import ResNet

FORMAT_VERSION = 1
CONFIG_FILE = "cbam_jax.json"
VARIABLES_DIR = "variables"
# ImageNet evaluation preprocessing of the official checkpoints: resize the short side to 256,
# center-crop 224, scale to [0, 1], normalise per RGB channel.
IMAGENET_PREPROCESSING: dict[str, Any] = {
    "resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
}


def save_pretrained(path: str | os.PathLike, model: ResNet, variables: Mapping[str, Any], *,
                    metadata: dict[str, Any] | None = None, overwrite: bool = False, hub: bool = False) -> Path:
    """Write `model` and its `variables` ('params' and, if any, 'batch_stats') to the directory `path`.

    `hub=True` writes a Hugging Face Hub-ready folder instead (safetensors, config.json, a model
    card; `cbam_jax.hub`), which `load_pretrained` reads as well.

    The directory appears complete or not at all (`cbam_jax.atomic.atomic_output`): it is written
    under a temporary name beside `path` and renamed at the end.

    Args:
      path: the directory to create.
      model: the `ResNet` the variables belong to (its config goes to cbam_jax.json).
      variables: `model.init(...)`-style variables; collections other than params/batch_stats
        (e.g. 'intermediates') are not saved.
      metadata: JSON-serialisable extras (see the module docstring for the conventions).
      overwrite: replace an existing `path` (readers see the old directory or the new one, never a
        mix); by default an existing `path` is an error and nothing is overwritten.

    Returns:
      The directory as a Path.
    """
    if hub:
        from cbam_jax import hub as hf_hub
        return hf_hub.save_folder(path, model, variables, metadata=metadata)
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise OutputExists(f"save_pretrained: {path} already exists; choose a new path or remove it first.")
    if "params" not in variables:
        raise ValueError(f"save_pretrained: variables must contain 'params'; got collections {sorted(variables)}.")
    tree = {name: _to_numpy(variables[name]) for name in ("params", "batch_stats") if name in variables}
    document = {"format_version": FORMAT_VERSION, "model": registry.model_config(model), "metadata": metadata or {}}
    try:
        document_text = json.dumps(document, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"save_pretrained: metadata must be JSON-serialisable ({error}).") from None

    with atomic_output(path, folder=True, replace=overwrite) as staging:
        process_local_checkpointer().save(staging / VARIABLES_DIR, tree)
        (staging / CONFIG_FILE).write_text(document_text + "\n")
    return path


def load_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata dict saved with the pretrained directory `path` (empty if none was given)."""
    from cbam_jax import hub
    if hub.is_hub_id(path) or hub.is_hub_folder(path):
        return hub.load_metadata(path)
    return _read_document(Path(path))["metadata"]


class NonFiniteWeights(InvalidInput):
    """Weights that hold NaN or infinite values (e.g. saved from a diverged training run)."""

    def for_option(self, option: str) -> "NonFiniteWeights":
        """The same error naming the command-line `option` (e.g. '--allow-nonfinite') as the override."""
        return NonFiniteWeights(str(self).replace("allow_nonfinite=True", option))


def check_finite(arrays: Mapping[str, Any], origin: str, override: str = "allow_nonfinite=True") -> None:
    """NonFiniteWeights naming the arrays of `arrays` (nested mappings of arrays) with NaN or inf values.

    `override` is how the caller lets such weights through (an option name), said in the message.
    """
    flat = _flatten(arrays)
    broken = [key for key, value in flat.items() if not np.isfinite(np.asarray(value, np.float32)).all()]
    if broken:
        raise NonFiniteWeights(f"{origin}: {len(broken)} of {len(flat)} weight arrays hold NaN or infinite values "
                               f"(e.g. {', '.join(broken[:3])}); these weights are broken (saved from a diverged "
                               f"run?). Use other weights, or {override} to load them anyway.")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        flat.update(_flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def load_pretrained(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[ResNet, dict[str, Any]]:
    """Rebuild `(model, variables)` from a `save_pretrained` directory, a Hub-ready folder, or a
    Hugging Face Hub repository 'hf-hub:ORG/NAME[@REVISION]' (`cbam_jax.hub`).

    `variables` is {'params': ..., 'batch_stats': ...} of jax arrays, ready for
    `model.apply(variables, x)` with x of shape (B, H, W, C).

    Weights holding NaN or inf are refused (`NonFiniteWeights`) unless `allow_nonfinite`.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: `path` is not a cbam-jax pretrained directory, its files are corrupt or do not
        match the model they describe, or its weights are not finite.
    """
    from cbam_jax import hub
    if hub.is_hub_id(path) or hub.is_hub_folder(path):
        model, variables = hub.load(path)
        if not allow_nonfinite:
            check_finite(variables, str(path))
        return model, variables
    path = Path(path).absolute()
    document = _read_document(path)
    try:
        model = registry.model_from_config(document["model"])
    except (TypeError, ValueError) as error:
        raise InvalidInput(f"load_pretrained: {path / CONFIG_FILE} describes an invalid model: {error}") from None
    variables_dir = path / VARIABLES_DIR
    if not variables_dir.is_dir():
        raise InvalidInput(f"load_pretrained: {path} has no '{VARIABLES_DIR}/' checkpoint; the directory is incomplete.")
    try:
        restored = process_local_checkpointer().restore(variables_dir)
    except Exception as error:  # orbax raises many kinds of errors for damaged files
        raise InvalidInput(f"load_pretrained: cannot read the checkpoint in {variables_dir} "
                         f"(corrupt or incomplete?): {type(error).__name__}: {error}") from None
    variables = {name: jax.tree.map(jax.numpy.asarray, unfreeze(restored[name]))
                 for name in ("params", "batch_stats") if name in restored}
    _check_matches_model(path, model, variables)
    if not allow_nonfinite:
        check_finite(variables, str(path))
    return model, variables


def _read_document(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise MissingInput(f"No pretrained model at {path}: the directory does not exist.")
    config_file = path / CONFIG_FILE
    if not path.is_dir() or not config_file.is_file():
        raise InvalidInput(f"{path} is not a cbam-jax pretrained directory (no {CONFIG_FILE}); create one with "
                         "cbam_jax.save_pretrained or `cbam-jax convert`.")
    try:
        document = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInput(f"{config_file} is corrupt (not valid JSON): {error}") from None
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise InvalidInput(f"{config_file} is not a cbam-jax model file: no 'model' config object.")
    if document.get("format_version") != FORMAT_VERSION:
        raise InvalidInput(f"{config_file} has format_version {document.get('format_version')!r}; this version of "
                         f"cbam-jax reads format_version {FORMAT_VERSION}.")
    document.setdefault("metadata", {})
    return document


def _check_matches_model(path: Path, model: ResNet, variables: dict[str, Any]) -> None:
    """ValueError unless the restored variables have exactly the model's structure and shapes."""
    in_channels = variables.get("params", {}).get("conv1", {}).get("kernel")
    if in_channels is None:
        raise InvalidInput(f"load_pretrained: the checkpoint in {path} has no params/conv1/kernel; it is not a ResNet's.")
    dummy = jax.ShapeDtypeStruct((1, 32, 32, in_channels.shape[2]), model.dtype)
    expected = jax.eval_shape(model.init, jax.random.key(0), dummy)
    expected_shapes = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(
        {c: expected[c] for c in ("params", "batch_stats") if c in expected})}
    found_shapes = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(variables)}
    if expected_shapes != found_shapes:
        missing = sorted(set(expected_shapes) - set(found_shapes))
        unexpected = sorted(set(found_shapes) - set(expected_shapes))
        reshaped = sorted(k for k in set(expected_shapes) & set(found_shapes) if expected_shapes[k] != found_shapes[k])
        raise InvalidInput(f"load_pretrained: the checkpoint in {path} does not fit the model in {CONFIG_FILE}: "
                         f"missing {missing[:10]}, unexpected {unexpected[:10]}, wrong shape {reshaped[:10]}.")


def process_local_checkpointer(handler: type = ocp.PyTreeCheckpointHandler) -> ocp.Checkpointer:
    """A checkpointer (of arrays, or of `handler`'s items, e.g. ocp.JsonCheckpointHandler) that reads
    and writes from the calling process alone: in a multi-process run (e.g. process 0 exporting at
    the end of training) the default one would wait for the others."""
    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                              active_processes={jax.process_index()})
    return ocp.Checkpointer(handler(multiprocessing_options=alone), multiprocessing_options=alone)


def _to_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, unfreeze(tree))
