"""The Hugging Face Hub: `hf-hub:ORG/NAME[@REVISION]` ids <-> local pretrained folders, and publishing.

    model, variables = cbam_jax.load_pretrained("hf-hub:ORG/NAME@v1.0")      # or a commit hash, a branch
    cbam_jax.save_pretrained("out/", model, variables, metadata=...)         # every folder is Hub-ready
    cbam_jax.hub.push_to_hub("out/", "ORG/NAME")                             # upload it

A Hub repository holds what a pretrained folder holds (`cbam_jax.pretrained`: config.json,
model.safetensors, README.md); it is fetched into the Hugging Face cache and read from there as a
folder. A repository with PyTorch weights as `model.safetensors` and no cbam-jax config (e.g. timm's
`timm/resnet50.tv_in1k`) loads too, converted, with the preprocessing of its `pretrained_cfg`.
Loading never unpickles: only `config.json`, `*.safetensors` and `README.md` are downloaded or read,
and a repository that offers its weights only in a pickle-based format (`pytorch_model.bin`,
`*.pth`, ...) is refused. `huggingface_hub` (the `hub` extra) does the transfers (its cache, token,
`HF_HUB_OFFLINE` and `HF_ENDPOINT` apply).
"""

import os
import re
from pathlib import Path
from typing import Any

from cbam_jax.errors import InvalidInput, require
from cbam_jax.pretrained import (CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, is_pretrained_folder, load_metadata as
                                 load_folder_metadata, load_pretrained, save_pretrained)
from cbam_jax.resnet import ResNet

HUB_PREFIX = "hf-hub:"
SAFE_FILES = [CONFIG_FILE, "*.safetensors", CARD_FILE]  # all that is ever downloaded
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".tar", ".joblib")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class HubError(InvalidInput):
    """A Hub repository or folder that cannot be loaded or published; the message says why."""


def is_hub_id(source: str | os.PathLike) -> bool:
    """Whether `source` is an 'hf-hub:ORG/NAME[@REVISION]' id."""
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def is_hub_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a local folder in the one pretrained format (model.safetensors + config.json)."""
    return Path(path).is_dir() and (Path(path) / WEIGHTS_FILE).is_file()


def parse_hub_id(source: str) -> tuple[str, str | None]:
    """'hf-hub:ORG/NAME@REVISION' -> ('ORG/NAME', 'REVISION'); the revision is None when not pinned."""
    repo_id, at, revision = source[len(HUB_PREFIX):].partition("@")
    if not REPO_ID.fullmatch(repo_id) or (at and not revision):
        raise HubError(f"{source!r} is not a Hub id; write hf-hub:ORG/NAME, optionally @REVISION (a tag, branch or "
                       "commit hash), e.g. hf-hub:someone/cbam_resnet50@main.")
    return repo_id, revision or None


def load(source: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[ResNet, dict[str, Any]]:
    """(model, variables) from an 'hf-hub:...' id or a local pretrained folder.

    Raises:
      HubError: the repository or revision cannot be fetched, holds only pickles, or is not a model.
    """
    return load_pretrained(folder_of(source), allow_nonfinite=allow_nonfinite)


def load_metadata(source: str | os.PathLike) -> dict[str, Any]:
    """The metadata saved with a Hub model (class names, preprocessing, source, metrics); {} if none."""
    return load_folder_metadata(folder_of(source))


def save_folder(path: str | os.PathLike, model: ResNet, variables: Any, *, metadata: dict[str, Any] | None = None
                ) -> Path:
    """`cbam_jax.save_pretrained` (kept for callers of cbam-jax 0.1: every pretrained folder is Hub-ready)."""
    return save_pretrained(path, model, variables, metadata=metadata)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                commit_message: str = "Upload cbam-jax model", token: str | None = None, api: Any = None) -> Any:
    """Upload a pretrained folder (`save_pretrained`) to the repository `repo_id`.

    The repository is created if needed (`private` applies then). `api` is a `huggingface_hub.HfApi`
    (default: a new one with `token`). Returns the commit information of the upload.
    """
    folder = Path(folder)
    if not REPO_ID.fullmatch(repo_id) or "/" not in repo_id:
        raise HubError(f"push_to_hub: {repo_id!r} is not a repository id of the form ORG/NAME.")
    if not is_pretrained_folder(folder) or not (folder / CONFIG_FILE).is_file():
        raise HubError(f"push_to_hub: {folder} is not a cbam-jax pretrained folder (config.json + {WEIGHTS_FILE}); "
                       "write one with cbam_jax.save_pretrained(path, model, variables).")
    load_pretrained(folder)  # a damaged or foreign folder is not published
    if api is None:
        api = require("huggingface_hub", "hub").HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             commit_message=commit_message, allow_patterns=SAFE_FILES)


def folder_of(source: str | os.PathLike) -> Path:
    """The local folder holding `source`'s safe files: fetched into the Hugging Face cache for a Hub id,
    else `source` itself."""
    if not is_hub_id(source):
        return Path(source)
    repo_id, revision = parse_hub_id(str(source))
    snapshot_download = require("huggingface_hub", "hub").snapshot_download
    LocalEntryNotFoundError = require("huggingface_hub.utils", "hub").LocalEntryNotFoundError
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SAFE_FILES,
                                        library_name="cbam-jax"))
    except LocalEntryNotFoundError:
        raise HubError(_not_cached(source, repo_id, revision)) from None
    except Exception as error:  # huggingface_hub raises many kinds: not found, revision, HTTP, ...
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise HubError(f"Cannot get {source} from the Hugging Face Hub ({type(error).__name__}: {message}).") from None
    if not (folder / WEIGHTS_FILE).is_file():
        pickles = [f for f in _repo_files(repo_id, revision, folder) if f.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise HubError(f"Refusing {source}: its weights are only in pickle-based files ({', '.join(pickles[:3])}), "
                           "which cbam-jax never loads from the Hub (unpickling can run code); ask for a "
                           f"{WEIGHTS_FILE}, or convert a file you trust with `cbam-jax convert`.")
        raise HubError(f"{source} holds no {WEIGHTS_FILE}; it is not a cbam-jax (or safetensors PyTorch) model.")
    return folder


def _not_cached(source: str, repo_id: str, revision: str | None) -> str:
    """One line for a Hub id that is not in the local cache and cannot be fetched now."""
    constants = require("huggingface_hub.constants", "hub")  # read at call time: tests and users set them

    pinned = f" --revision {revision}" if revision else ""
    if constants.HF_HUB_OFFLINE:
        return (f"Cannot get {source}: offline (HF_HUB_OFFLINE is set) and not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); fetch it once online (unset HF_HUB_OFFLINE, or "
                f"`huggingface-cli download {repo_id}{pinned}`).")
    return (f"Cannot get {source}: the Hugging Face Hub is unreachable and it is not in the cache "
            f"({constants.HF_HUB_CACHE}); check the network (or HF_ENDPOINT) and try again.")


def _repo_files(repo_id: str, revision: str | None, folder: Path) -> list[str]:
    """The repository's file names: asked of the Hub, or (offline) those of the local snapshot."""
    try:
        return list(require("huggingface_hub", "hub").HfApi().list_repo_files(repo_id, revision=revision))
    except Exception:  # offline or unreachable: the cached snapshot is what we know
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
