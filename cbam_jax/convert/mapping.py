"""Moving weights between a PyTorch state_dict and Flax variables, in both directions.

Every tensor is accounted for: the Flax model's variables (from `jax.eval_shape` of its init)
name exactly the tensors the layout must supply, and anything missing, left over or wrongly shaped
is reported all at once instead of loading half a model.
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from cbam_jax.convert.detect import Detected, detect, infer_model, variant_of
from cbam_jax.convert.layout import NUM_BATCHES_TRACKED, Layout
from cbam_jax.convert.layouts import LAYOUT_OF_FAMILY, LAYOUT_OF_VARIANT, get_layout
from cbam_jax.convert.reading import ConversionError, read_state_dict
from cbam_jax.registry import model_config
from cbam_jax.resnet import ResNet

COLLECTIONS = ("params", "batch_stats")
LISTED = 12  # entries shown per category in a mismatch message


def from_torch(source: Mapping[str, Any] | str | os.PathLike, *, arch: str | None = None,
               variant: str | None = None, layout: str | None = None,
               strip_prefix: str | None = None, allow_nonfinite: bool = False) -> tuple[ResNet, dict[str, Any]]:
    """Load PyTorch ResNet weights (official CBAM/BAM, timm, common variant, pytorchcv, torchvision).

    Args:
      source: a state_dict, a wrapped training checkpoint, or a path to a .pth/.pth.tar/.pt/.bin
        (read with torch.load(weights_only=True)) or .safetensors file.
      arch: model name such as 'cbam_resnet50'; detected from the keys when None.
      variant: 'official', 'timm' or 'common'; the layout's own variant when None.
      layout: source layout name (see `cbam_jax.convert.layouts.LAYOUTS`); detected when None.
      strip_prefix: an extra key prefix to remove ('module.' always is).
      allow_nonfinite: accept weights holding NaN or inf (refused by default).

    Returns:
      (model, variables): a `ResNet` and {'params', 'batch_stats'} for `model.apply(variables, x)`,
      x of shape (B, H, W, 3).

    Raises:
      ConversionError: unreadable file, unknown layout, or keys/shapes that do not fit the model.
    """
    state = read_state_dict(source, strip_prefix=strip_prefix, allow_nonfinite=allow_nonfinite)
    detected = detect(state, arch=arch, variant=variant, layout=layout)
    model = detected.build()
    return model, load_variables(state, model, get_layout(detected.layout), detected=detected)


def load_variables(state: Mapping[str, np.ndarray], model: ResNet, layout: Layout, *,
                   detected: Detected | None = None) -> dict[str, Any]:
    """Flax variables of `model` from a flat state_dict in `layout`; ConversionError on any mismatch."""
    in_channels = _torch_in_channels(state, layout)
    abstract = _abstract_variables(model, in_channels)
    missing, wrong_shape, used, loaded = [], [], set(), {}
    for path, leaf in flatten_dict(abstract, sep="/").items():
        collection, *module, name = path.split("/")
        found = layout.torch_module("/".join(module))
        tensor = found[1].tensors.get(name) if found else None
        if tensor is None:
            missing.append(f"(no {layout.name!r} tensor for Flax {path})")
            continue
        key = f"{found[0]}.{tensor.torch_name}"
        expected = tensor.to_torch(np.broadcast_to(np.zeros((), np.float32), leaf.shape)).shape
        if key not in state:
            missing.append(key)
        elif state[key].shape != expected:
            used.add(key)
            wrong_shape.append(f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected)}")
        else:
            used.add(key)
            # A copy: numpy views of torch tensors share their memory, and jnp.asarray may keep
            # sharing it, so training the torch model on would change these "immutable" arrays.
            loaded[path] = jnp.array(tensor.to_flax(state[key]), dtype=leaf.dtype, copy=True)
    unexpected = sorted(set(state) - used)
    if missing or unexpected or wrong_shape:
        target = detected.describe() if detected else f"the given {layout.name!r}-layout model"
        raise ConversionError(_mismatch_message(f"The checkpoint does not fit {target}", missing, unexpected,
                                                wrong_shape, hint="Nothing was loaded. If the architecture was "
                                                "detected wrongly, pass arch=... and/or variant=... (CLI: --arch, "
                                                "--variant)."))
    return unfreeze(unflatten_dict(loaded, sep="/"))


def to_torch(variables: Mapping[str, Any], *, arch: str | ResNet, variant: str = "official",
             layout: str | None = None) -> dict[str, Any]:
    """A PyTorch state_dict (torch tensors) of Flax `variables`, loadable with `load_state_dict(strict=True)`.

    Args:
      variables: {'params': ..., 'batch_stats': ...} of a `ResNet`.
      arch: the model name ('cbam_resnet50') or the `ResNet` itself; the variables must fit it.
      variant: which PyTorch code the weights are for: 'official' (Jongchan ResidualNet keys),
        'timm' or 'common'. Ignored when `arch` is a `ResNet` (its own options decide).
      layout: write another layout of the same variant instead (e.g. 'pytorchcv', 'common_2018').

    Returns:
      {key: torch.Tensor}; BatchNorm `num_batches_tracked` counters are 0 (Flax does not keep them).
    """
    try:
        import torch
    except ImportError:
        raise ConversionError("to_torch needs PyTorch (`pip install 'cbam-jax[torch]'`); `to_numpy_state_dict` does not.") from None
    arrays = to_numpy_state_dict(variables, arch=arch, variant=variant, layout=layout)
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def to_numpy_state_dict(variables: Mapping[str, Any], *, arch: str | ResNet, variant: str = "official",
                        layout: str | None = None) -> dict[str, np.ndarray]:
    """`to_torch` with numpy arrays as values (e.g. for safetensors.numpy.save_file); no torch needed."""
    variables = {c: unfreeze(variables[c]) for c in COLLECTIONS if c in variables}
    found = {path: np.asarray(value) for path, value in flatten_dict(variables, sep="/").items()}
    if not isinstance(arch, str):  # a ResNet or MobileNet
        model, variant = arch, variant_of(arch)
    else:
        shapes = {path: value.shape for path, value in found.items()}
        model = infer_model(shapes, layout=LAYOUT_OF_VARIANT.get(variant, "official"), variant=variant,
                            arch=arch).build()
    family = model_config(model).get("family")
    target = get_layout(layout or LAYOUT_OF_FAMILY.get(family) or LAYOUT_OF_VARIANT[variant])
    if target.variant != variant:
        raise ConversionError(f"Layout {target.name!r} holds variant {target.variant!r} models, not {variant!r}.")
    kernel = found.get("params/conv1/kernel")
    expected = flatten_dict(_abstract_variables(model, kernel.shape[2] if kernel is not None else 3), sep="/")
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = [f"{p}: variables {found[p].shape}, model {expected[p].shape}"
                   for p in sorted(set(found) & set(expected)) if found[p].shape != expected[p].shape]
    if missing or unexpected or wrong_shape:
        target_name = arch if isinstance(arch, str) else "the given model"
        raise ConversionError(_mismatch_message(f"The variables do not fit {target_name} (variant {variant!r})",
                                                missing, unexpected, wrong_shape,
                                                hint="Pass the arch and variant the model was created with."))
    state = {}
    for path, value in found.items():
        _, *module, name = path.split("/")
        torch_module, kind = target.torch_module("/".join(module)) or (None, None)
        tensor = kind.tensors.get(name) if kind else None
        if tensor is None:
            raise ConversionError(f"Layout {target.name!r} has no place for Flax {path}.")
        if value.dtype not in (np.float16, np.float32, np.float64):
            value = value.astype(np.float32)  # e.g. bfloat16, which torch.from_numpy cannot take
        # A C-ordered writable copy: safetensors writes an array's memory as is, whatever its strides.
        state[f"{torch_module}.{tensor.torch_name}"] = np.array(tensor.to_torch(value), order="C")
        if kind.norm:
            state[f"{torch_module}.{NUM_BATCHES_TRACKED}"] = np.zeros((), np.int64)
    return state


def _abstract_variables(model: ResNet, in_channels: int) -> dict[str, Any]:
    """Shapes and dtypes of `model`'s params and batch_stats, without computing anything."""
    dummy = jax.ShapeDtypeStruct((1, 32, 32, in_channels), model.dtype)
    abstract = jax.eval_shape(model.init, jax.random.key(0), dummy)
    return {c: unfreeze(abstract[c]) for c in COLLECTIONS if c in abstract}


def _torch_in_channels(state: Mapping[str, np.ndarray], layout: Layout) -> int:
    stem = state.get(f"{layout.torch_module('conv1')[0]}.weight")
    return stem.shape[1] if stem is not None and stem.ndim == 4 else 3


def _mismatch_message(title: str, missing: list[str], unexpected: list[str], wrong_shape: list[str], *,
                      hint: str) -> str:
    lines = [f"{title}: {len(missing)} missing, {len(unexpected)} unexpected, {len(wrong_shape)} wrongly-shaped."]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if items:
            more = f" ... and {len(items) - LISTED} more" if len(items) > LISTED else ""
            lines.append(f"  {label}: " + ", ".join(items[:LISTED]) + more)
    lines.append(hint)
    return "\n".join(lines)
