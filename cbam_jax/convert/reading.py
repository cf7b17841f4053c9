"""Reading PyTorch checkpoints safely into a flat {key: numpy array} state_dict.

`.pth`/`.pth.tar`/`.pt`/`.bin`/`.ckpt` go through `torch.load(..., weights_only=True)`, which refuses
to run code hidden in a pickle; `.safetensors` is read with safetensors alone (no torch needed).
Training checkpoints are unwrapped ({'state_dict': ..., 'epoch': ..., 'optimizer': ...}), the
DataParallel prefix `module.` is removed and `num_batches_tracked` counters are dropped.
"""

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

from cbam_jax.checks import check_finite
from cbam_jax.convert.layout import NUM_BATCHES_TRACKED
from cbam_jax.errors import InvalidInput


class ConversionError(InvalidInput):
    """A checkpoint that cannot be read or does not fit the model; the message says why and what to do."""


TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")
# Keys under which training scripts store the model's state_dict, tried in order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "state_dict_ema")
DATA_PARALLEL_PREFIX = "module."


def read_state_dict(source: Mapping[str, Any] | str | os.PathLike, *, strip_prefix: str | None = None,
                    allow_nonfinite: bool = False) -> dict[str, np.ndarray]:
    """A flat float state_dict {key: numpy array} from a mapping or a checkpoint file.

    Args:
      source: a state_dict (values: torch tensors or numpy arrays), a wrapped training checkpoint,
        or a path to a .pth/.pth.tar/.pt/.bin/.ckpt or .safetensors file.
      strip_prefix: an extra key prefix to remove (e.g. 'model.backbone.'); 'module.' always is.
      allow_nonfinite: accept tensors holding NaN or inf (refused by default: broken weights).

    Raises:
      ConversionError: unreadable, truncated or unsafe file, or not a state_dict.
      NonFiniteWeights: a tensor holds NaN or inf (unless `allow_nonfinite`).
    """
    if isinstance(source, Mapping):
        raw, origin = source, "the given state_dict"
    else:
        path = Path(source)
        raw, origin = _read_file(path), str(path)
    state = _unwrap(raw, origin)
    arrays = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ConversionError(f"{origin} is not a state_dict: key {key!r} is not a string.")
        if key.endswith(NUM_BATCHES_TRACKED):
            continue
        arrays[key] = _to_numpy(value, key, origin)
    if not arrays:
        raise ConversionError(f"{origin} holds no tensors.")
    if not allow_nonfinite:
        check_finite(arrays, origin)
    return _strip_prefixes(arrays, strip_prefix, origin)


def _read_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise ConversionError(f"No checkpoint file at {path}." + (" It is a directory." if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ConversionError(f"Cannot read {path} as safetensors (truncated or not a safetensors file): "
                                  f"{error}") from None
    if path.suffix not in TORCH_SUFFIXES:
        raise ConversionError(f"Unknown checkpoint type {path.name!r}: expected a PyTorch file "
                              f"({', '.join(TORCH_SUFFIXES)}) or .safetensors.")
    try:
        import torch
    except ImportError:
        raise ConversionError(f"Reading {path.name} needs PyTorch (`pip install 'cbam-jax[torch]'`); alternatively save "
                              "the state_dict as .safetensors, which cbam-jax reads without torch.") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise ConversionError(
                f"Refusing to load {path}: it contains Python objects or code beyond tensors, which "
                "torch.load(weights_only=True) will not unpickle. If you trust the file, re-save its "
                "state_dict with torch.save(model.state_dict(), ...) or as .safetensors.") from None
        raise ConversionError(f"{path} is not a PyTorch checkpoint (the pickle is unreadable: {error}).") from None
    except Exception as error:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise ConversionError(f"Cannot read {path}: truncated or not a PyTorch checkpoint "
                              f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}).") from None


def _unwrap(raw: Any, origin: str) -> Mapping[str, Any]:
    """The state_dict inside a training checkpoint ({'state_dict': ..., 'epoch': ...}), or `raw` itself."""
    if not isinstance(raw, Mapping):
        raise ConversionError(f"{origin} holds a {type(raw).__name__}, not a state_dict (a dict of tensors).")
    while not _looks_like_tensors(raw):
        inner = next((raw[k] for k in WRAPPER_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            raise ConversionError(f"{origin} is neither a state_dict nor a training checkpoint with one of "
                                  f"{list(WRAPPER_KEYS)}; its top-level keys are {sorted(map(str, raw))[:10]}.")
        raw = inner
    return raw


def _looks_like_tensors(mapping: Mapping[str, Any]) -> bool:
    return bool(mapping) and all(hasattr(v, "shape") and hasattr(v, "dtype") for v in mapping.values())


def _to_numpy(value: Any, key: str, origin: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConversionError(f"{origin}: {key} holds {array.dtype} values, not floating-point weights.")
    return array


def _strip_prefixes(arrays: dict[str, np.ndarray], strip_prefix: str | None, origin: str) -> dict[str, np.ndarray]:
    for prefix in (DATA_PARALLEL_PREFIX, strip_prefix):
        if prefix and all(key.startswith(prefix) for key in arrays):
            arrays = {key[len(prefix):]: value for key, value in arrays.items()}
        elif prefix and prefix != DATA_PARALLEL_PREFIX:
            stray = next(key for key in arrays if not key.startswith(prefix))
            raise ConversionError(f"{origin}: strip_prefix {prefix!r} given, but key {stray!r} does not start with it.")
    return arrays
