"""What the network attends to, as arrays: the attention maps a model sows, and Grad-CAM.

Grad-CAM (Selvaraju et al., ICCV 2017) needs a feature map A (B, h, w, C) inside the network and
the gradient of a class logit y_c with respect to it:

    cam = ReLU( sum_k alpha_k A_k ),   alpha_k = mean over positions of d y_c / d A_k

The model is left untouched: a Flax method interceptor adds a zero array `delta` to the output of
the chosen block, so d y_c / d delta is exactly d y_c / d A.
"""

import functools
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Attention-map leaves sown by the layers (cbam_jax/layers): channel (B, C), spatial (B, H, W).
SOWN = {"channel_attention": "channel", "spatial_attention": "spatial"}
# Top-level modules of a ResNet that hold attention: per-block 'layer{S}_{B}', per-stage 'bam{S}'.
BLOCK_NAME = re.compile(r"^layer(\d+)_(\d+)$")
STAGE_NAME = re.compile(r"^bam(\d+)$")


def module_order(name: str) -> tuple[int, int]:
    """Network order of a top-level module name: layer{S}_{B} -> (S, B); bam{S} comes after stage S."""
    if match := BLOCK_NAME.match(name):
        return int(match[1]), int(match[2])
    if match := STAGE_NAME.match(name):
        return int(match[1]), sys.maxsize
    return sys.maxsize, 0


def stage_of(name: str) -> int:
    """The stage number S (from 1) of 'layer{S}_{B}' or 'bam{S}'."""
    return module_order(name)[0]


def _find_sown(tree: Mapping[str, Any], found: dict[str, jax.Array]) -> dict[str, jax.Array]:
    for key, value in tree.items():
        if key in SOWN:
            found[SOWN[key]] = value[-1]  # sow appends one entry per call; the model calls each layer once
        elif isinstance(value, Mapping):
            _find_sown(value, found)
    return found


def upsample(maps: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of maps (B, h, w) to (B, *size), clipped to [0, 1] (bilinear is a convex mix)."""
    resized = jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], *size), method="bilinear")
    return jnp.clip(resized, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _attention_maps(model: nn.Module, variables: Any, images: jax.Array, resize: bool) -> dict:
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    maps = {name: _find_sown(subtree, {}) for name, subtree in state.get("intermediates", {}).items()}
    if resize:
        for entry in maps.values():
            if "spatial" in entry:
                entry["spatial"] = upsample(entry["spatial"], images.shape[1:3])
    return {name: entry for name, entry in maps.items() if entry}


def attention_maps(model: nn.Module, variables: Any, images: jax.Array | np.ndarray, *,
                   resize: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """The attention maps a model computes for preprocessed images (B, H, W, Cin), in eval mode.

    Args:
      model: a `ResNet` (any attention: 'cbam', 'bam', 'se'; none gives an empty dict).
      variables: its variables ('params', 'batch_stats').
      images: preprocessed NHWC images.
      resize: upsample spatial maps bilinearly to the input size (H, W); False keeps the feature
        map's resolution.

    Returns:
      {module name: {"channel": (B, C), "spatial": (B, H, W)}} in network order, module names as
      in the parameter tree ('layer1_0' ... for per-block CBAM/SE, 'bam1' ... for BAM); SE and
      channel-only CBAM have no "spatial" entry. Values are the gates' sigmoids, in [0, 1].
    """
    maps = _attention_maps(model, variables, jnp.asarray(images), resize)
    return {name: {kind: np.asarray(value) for kind, value in maps[name].items()}
            for name in sorted(maps, key=module_order)}


def last_block_name(model: nn.Module) -> str:
    """The name of the last residual block of a ResNet, e.g. 'layer4_2' for ResNet-50."""
    stage_sizes = model.stage_sizes
    return f"layer{len(stage_sizes)}_{stage_sizes[-1] - 1}"


class GradCAM(NamedTuple):
    """Grad-CAM maps (B, H, W) in [0, 1] (each divided by its maximum), the explained class (B,) and logits (B, K)."""

    maps: np.ndarray
    class_index: np.ndarray
    logits: np.ndarray


@functools.partial(jax.jit, static_argnums=(0, 3, 5))
def _grad_cam(model: nn.Module, variables: Any, images: jax.Array, layer: str, class_index: jax.Array,
              resize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    def logits_and_features(delta: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        captured = []

        def add_delta(call, args, kwargs, context):
            out = call(*args, **kwargs)
            if context.method_name == "__call__" and context.module.scope.path == (layer,):
                out = out if delta is None else out + delta.astype(out.dtype)
                captured.append(out)
            return out

        with nn.intercept_methods(add_delta):
            logits = model.apply(variables, images, train=False)
        if len(captured) != 1:
            raise ValueError(f"grad_cam: the model has no module {layer!r} called once; "
                             f"use a block name such as {last_block_name(model)!r}.")
        return logits, captured[0]

    features_shape = jax.eval_shape(lambda: logits_and_features(None)[1])
    (logits, features), backward = jax.vjp(logits_and_features, jnp.zeros(features_shape.shape, jnp.float32))
    class_index = jnp.where(class_index < 0, jnp.argmax(logits, axis=-1), class_index)
    # Each image's logit depends only on that image (eval-mode BatchNorm), so one backward pass of
    # the sum of the chosen logits gives every image its own gradient.
    (gradients,) = backward((jax.nn.one_hot(class_index, logits.shape[-1], dtype=logits.dtype),
                             jnp.zeros_like(features)))
    features = features.astype(jnp.float32)
    weights = jnp.mean(gradients, axis=(1, 2))  # (B, C)
    cam = nn.relu(jnp.einsum("bhwc,bc->bhw", features, weights))
    peak = jnp.max(cam, axis=(1, 2), keepdims=True)
    cam = jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)
    if resize:
        cam = upsample(cam, images.shape[1:3])
    return cam, class_index, logits


def grad_cam(model: nn.Module, variables: Any, images: jax.Array | np.ndarray,
             class_index: int | Sequence[int] | np.ndarray | None = None, *, layer: str | None = None,
             resize: bool = True) -> GradCAM:
    """Grad-CAM of preprocessed images (B, H, W, Cin) at the output of one block, in eval mode.

    Args:
      model: a `ResNet` with a classification head (num_classes > 0).
      variables: its variables.
      images: preprocessed NHWC images.
      class_index: the class to explain: None (each image's top class), one int for all images, or
        one per image.
      layer: the block whose output is the feature map (default: the last block of the last stage,
        `last_block_name(model)`); any top-level block name such as 'layer3_5'.
      resize: upsample the maps bilinearly to the input size (H, W).

    Returns:
      `GradCAM(maps (B, H, W) in [0, 1], class_index (B,), logits (B, num_classes))`; a map is all
      zeros where no position has positive evidence for the class.
    """
    if getattr(model, "num_classes", 0) < 1:
        raise ValueError("grad_cam needs a model with a classification head (num_classes > 0).")
    images = jnp.asarray(images)
    batch = images.shape[0]
    if class_index is None:
        targets = np.full((batch,), -1, np.int32)
    else:
        targets = np.broadcast_to(np.asarray(class_index, np.int64), (batch,)).astype(np.int32)
        if targets.min() < 0 or targets.max() >= model.num_classes:
            raise ValueError(f"grad_cam: class_index must be in [0, {model.num_classes}); got {class_index!r}.")
    cam, classes, logits = _grad_cam(model, variables, images, layer or last_block_name(model),
                                     jnp.asarray(targets), resize)
    return GradCAM(np.asarray(cam), np.asarray(classes), np.asarray(logits))
