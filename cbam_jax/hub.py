"""The Hugging Face Hub: load `hf-hub:ORG/NAME[@REVISION]`, write Hub-ready folders, publish them.

    model, variables = cbam_jax.load_pretrained("hf-hub:ORG/NAME@v1.0")      # or a commit hash, a branch
    cbam_jax.save_pretrained("out/", model, variables, metadata=..., hub=True)   # a Hub-ready folder
    cbam_jax.hub.push_to_hub("out/", "ORG/NAME")                                # upload it

A cbam-jax Hub repository (and the folder `save_pretrained(..., hub=True)` writes) holds:

    config.json        {"library_name": "cbam-jax", "format_version": 1, "model": model_config, "metadata": {...}}
    model.safetensors  every variable under its Flax path ('params/layer1_0/conv1/kernel'); no pickle
    README.md          the model card: architecture, parameters, reported accuracy, preprocessing, usage

A repository with PyTorch weights as `model.safetensors` and no cbam-jax config (e.g. timm's
`timm/resnet50.tv_in1k`) loads too, converted as `cbam_jax.convert.from_torch` does. Loading never
unpickles: only `config.json`, `*.safetensors` and `README.md` are downloaded or read, and a repository
that offers its weights only in a pickle-based format (`pytorch_model.bin`, `*.pth`, ...) is refused.
`huggingface_hub` does the transfers (its cache, token, `HF_HUB_OFFLINE` and `HF_ENDPOINT` apply).
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from cbam_jax import registry
from cbam_jax.atomic import OutputExists, atomic_output
from cbam_jax.errors import InvalidInput, require
from cbam_jax.resnet import ResNet

HUB_PREFIX = "hf-hub:"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
LIBRARY_NAME = "cbam-jax"
FORMAT_VERSION = 1
SAFE_FILES = [CONFIG_FILE, "*.safetensors", CARD_FILE]  # all that is ever downloaded
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".tar", ".joblib")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
COLLECTIONS = ("params", "batch_stats")


class HubError(InvalidInput):
    """A Hub repository or folder that cannot be loaded or published; the message says why."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` is an 'hf-hub:ORG/NAME[@REVISION]' id."""
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def is_hub_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a local Hub-layout folder (config.json + model.safetensors, no cbam_jax.json)."""
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS_FILE).is_file() and not (path / "cbam_jax.json").exists()


def parse_hub_id(source: str) -> tuple[str, str | None]:
    """'hf-hub:ORG/NAME@REVISION' -> ('ORG/NAME', 'REVISION'); the revision is None when not pinned."""
    repo_id, at, revision = source[len(HUB_PREFIX):].partition("@")
    if not REPO_ID.fullmatch(repo_id) or (at and not revision):
        raise HubError(f"{source!r} is not a Hub id; write hf-hub:ORG/NAME, optionally @REVISION (a tag, branch or "
                       "commit hash), e.g. hf-hub:someone/cbam_resnet50@main.")
    return repo_id, revision or None


def load(source: str | os.PathLike) -> tuple[ResNet, dict[str, Any]]:
    """(model, variables) from an 'hf-hub:...' id or a local Hub-layout folder (see the module docstring).

    Raises:
      HubError: the repository or revision cannot be fetched, holds only pickles, or is not a model.
    """
    folder, origin = _resolve(source)
    document = _read_config(folder, origin)
    weights = folder / WEIGHTS_FILE
    if document is None:  # PyTorch weights in safetensors (timm and others)
        from cbam_jax.convert import from_torch
        return from_torch(weights)
    try:
        model = registry.model_from_config(document["model"])
    except (TypeError, ValueError) as error:
        raise HubError(f"{origin}: {CONFIG_FILE} describes an invalid model: {error}") from None
    variables = _read_variables(weights, origin)
    from cbam_jax.pretrained import _check_matches_model  # one home for the structure check
    _check_matches_model(folder, model, variables)
    return model, jax.tree.map(jax.numpy.asarray, variables)


def load_metadata(source: str | os.PathLike) -> dict[str, Any]:
    """The metadata saved with a Hub model (class names, preprocessing, source, metrics); {} if none."""
    folder, origin = _resolve(source)
    document = _read_config(folder, origin)
    return dict(document.get("metadata") or {}) if document else {}


def save_folder(path: str | os.PathLike, model: ResNet, variables: Mapping[str, Any], *,
                metadata: dict[str, Any] | None = None) -> Path:
    """Write a Hub-ready folder: model.safetensors, config.json and a model card (README.md).

    The folder appears complete or not at all (`cbam_jax.atomic.atomic_output`); an
    existing `path` is an error. `metadata` follows `cbam_jax.pretrained`'s conventions; its
    'metrics' ({'top1': ..., 'top5': ..., 'dataset': ..., 'reported_by': ...}) and 'source' go into
    the card. Returns the folder.
    """
    from safetensors.numpy import save_file

    path = Path(path).absolute()
    if path.exists():
        raise OutputExists(f"save_pretrained: {path} already exists; choose a new path or remove it first.")
    if "params" not in variables:
        raise ValueError(f"save_pretrained: variables must contain 'params'; got collections {sorted(variables)}.")
    tree = {c: unfreeze(variables[c]) for c in COLLECTIONS if c in variables}
    arrays = {key: np.ascontiguousarray(np.asarray(value)) for key, value in flatten_dict(tree, sep="/").items()}
    document = {"library_name": LIBRARY_NAME, "format_version": FORMAT_VERSION,
                "model": registry.model_config(model), "metadata": metadata or {}}
    try:
        config_text = json.dumps(document, indent=2, sort_keys=True)
    except TypeError as error:
        raise ValueError(f"save_pretrained: metadata must be JSON-serialisable ({error}).") from None
    card = model_card(model, arrays, metadata or {})
    with atomic_output(path, folder=True) as staging:
        save_file(arrays, staging / WEIGHTS_FILE, metadata={"format": "flax", "library": LIBRARY_NAME})
        (staging / CONFIG_FILE).write_text(config_text + "\n")
        (staging / CARD_FILE).write_text(card)
    return path


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                commit_message: str = "Upload cbam-jax model", token: str | None = None, api: Any = None) -> Any:
    """Upload a Hub-ready folder (`save_pretrained(..., hub=True)`) to the repository `repo_id`.

    The repository is created if needed (`private` applies then). `api` is a `huggingface_hub.HfApi`
    (default: a new one with `token`). Returns the commit information of the upload.
    """
    folder = Path(folder)
    if not REPO_ID.fullmatch(repo_id) or "/" not in repo_id:
        raise HubError(f"push_to_hub: {repo_id!r} is not a repository id of the form ORG/NAME.")
    if not is_hub_folder(folder) or _read_config(folder, str(folder)) is None:
        raise HubError(f"push_to_hub: {folder} is not a Hub-ready cbam-jax folder (config.json + {WEIGHTS_FILE}); "
                       "write one with cbam_jax.save_pretrained(path, model, variables, hub=True).")
    if api is None:
        api = require("huggingface_hub", "hub").HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             commit_message=commit_message, allow_patterns=SAFE_FILES)


def model_card(model: ResNet, arrays: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> str:
    """The README.md of a Hub repository: YAML front matter and the model's numbers."""
    num_params = sum(int(np.prod(v.shape)) for k, v in arrays.items() if k.startswith("params/"))
    source = metadata.get("source") or {}
    metrics = metadata.get("metrics") or {}
    preprocessing = metadata.get("preprocessing") or {}
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
    depth = {v: k for k, v in registry.DEPTHS.items()}.get((model.block, tuple(model.stage_sizes)))
    prefix = next(p for p, kind in registry.PREFIXES.items() if kind == model.attention)
    return f"{prefix}resnet{depth}" if depth else f"{prefix}resnet (stages {list(model.stage_sizes)})"


def _resolve(source: str | os.PathLike) -> tuple[Path, str]:
    """The local folder holding `source`'s safe files (downloaded for a Hub id), and a name for messages."""
    if not is_hub_id(source):
        return Path(source), str(source)
    repo_id, revision = parse_hub_id(str(source))
    snapshot_download = require("huggingface_hub", "hub").snapshot_download
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=SAFE_FILES, library_name=LIBRARY_NAME)
    except Exception as error:  # huggingface_hub raises many kinds: offline, not found, revision, HTTP, ...
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise HubError(f"Cannot get {source} from the Hugging Face Hub ({type(error).__name__}: {message}).") from None
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = [f for f in _repo_files(repo_id, revision, folder) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise HubError(f"Refusing {source}: its weights are only in pickle-based files ({', '.join(pickles[:3])}), "
                           "which cbam-jax never loads from the Hub (unpickling can run code); ask for a "
                           f"{WEIGHTS_FILE}, or convert a file you trust with `cbam-jax convert`.")
        raise HubError(f"{source} holds no {WEIGHTS_FILE}; it is not a cbam-jax (or safetensors PyTorch) model.")
    return folder, str(source)


def _repo_files(repo_id: str, revision: str | None, folder: Path) -> list[str]:
    """The repository's file names: asked of the Hub, or (offline) those of the local snapshot."""
    try:
        from huggingface_hub import HfApi
        return list(HfApi().list_repo_files(repo_id, revision=revision))
    except Exception:  # offline or unreachable: the cached snapshot is what we know
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _read_config(folder: Path, origin: str) -> dict[str, Any] | None:
    """A cbam-jax config.json's content; None when the folder holds other (PyTorch safetensors) weights."""
    if not (folder / WEIGHTS_FILE).is_file():
        raise HubError(f"{origin} holds no {WEIGHTS_FILE}.")
    config = folder / CONFIG_FILE
    if not config.is_file():
        return None
    try:
        document = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(f"{origin}: {CONFIG_FILE} is not valid JSON ({error}).") from None
    if not isinstance(document, dict) or document.get("library_name") != LIBRARY_NAME:
        return None  # another library's config (e.g. timm's): the weights are PyTorch's
    if document.get("format_version") != FORMAT_VERSION or not isinstance(document.get("model"), dict):
        raise HubError(f"{origin}: {CONFIG_FILE} has format_version {document.get('format_version')!r} or no model; "
                       f"this cbam-jax reads format_version {FORMAT_VERSION}.")
    return document


def _read_variables(weights: Path, origin: str) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        arrays = load_file(weights)
    except (SafetensorError, OSError, ValueError) as error:
        raise HubError(f"{origin}: {WEIGHTS_FILE} is unreadable (truncated?): {error}") from None
    if not arrays or not all(key.split("/")[0] in COLLECTIONS for key in arrays):
        raise HubError(f"{origin}: {WEIGHTS_FILE} does not hold cbam-jax variables (keys like 'params/conv1/kernel').")
    return unflatten_dict(arrays, sep="/")
