"""What the network attends to, as arrays: the attention maps a model sows, and Grad-CAM.

Grad-CAM (Selvaraju et al., ICCV 2017) needs a feature map A (B, h, w, C) inside the network and
the gradient of a class logit y_c with respect to it:

    cam = ReLU( sum_k alpha_k A_k ),   alpha_k = mean over positions of d y_c / d A_k

The model is left untouched: a Flax method interceptor adds a zero array `delta` to the output of
the chosen block, so d y_c / d delta is exactly d y_c / d A.

Names, for every family of the registry (`cbam_jax.list_models()`):

- attention maps are named after the module that computes them: a ResNet's (ResNeXt's, Wide
  ResNet's) block 'layer{S}_{B}' (its one SE or CBAM module), a BAM module 'bam{S}', and a
  MobileNet unit's two modules 'stage{S}_{U}/dw' (after the depthwise conv) and 'stage{S}_{U}/pw'
  (after the pointwise conv);
- Grad-CAM explains the output of one top-level block (`block_names`): a residual block
  'layer{S}_{B}' of a ResNet, a depthwise-separable unit 'stage{S}_{U}' of a MobileNet (the output
  of its pointwise conv, BatchNorm and ReLU, after its attention). The default is the last one
  (`last_block_name`): the last feature map before the global pool, as in the Grad-CAM paper.
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

from cbam_jax.mobilenet import MobileNet
from cbam_jax.resnet import ResNet

# Attention-map leaves sown by the layers (cbam_jax/layers): channel (B, C), spatial (B, H, W).
SOWN = {"channel_attention": "channel", "spatial_attention": "spatial"}
# Top-level modules that hold attention: a ResNet's blocks 'layer{S}_{B}' and per-stage 'bam{S}', a
# MobileNet's units 'stage{S}_{U}'.
BLOCK_NAME = re.compile(r"^(?:layer|stage)(\d+)_(\d+)$")
STAGE_NAME = re.compile(r"^bam(\d+)$")
# The attention modules inside a block, in the order they run, and what their maps' name adds to the
# block's: a residual block's one 'attention' is named after the block, a MobileNet unit's two are
# '{unit}/dw' and '{unit}/pw'.
SITES = {"attention": "", "dw_attention": "dw", "pw_attention": "pw"}


def map_name(block: str, child: str) -> str:
    """The name of the maps of attention module `child` inside top-level module `block`."""
    site = SITES.get(child, child)
    return f"{block}/{site}" if site else block


def module_order(name: str) -> tuple[int, int, int]:
    """Network order of an attention map's name: 'layer{S}_{B}' -> (S, B, 0); a MobileNet unit's
    'stage{S}_{U}/dw' -> (S, U, 1) before 'stage{S}_{U}/pw' -> (S, U, 2); 'bam{S}' comes after stage S."""
    block, _, site = name.partition("/")
    order = list(SITES.values())
    site_index = order.index(site) if site in order else len(order)
    if match := BLOCK_NAME.match(block):
        return int(match[1]), int(match[2]), site_index
    if match := STAGE_NAME.match(block):
        return int(match[1]), sys.maxsize, 0
    return sys.maxsize, 0, 0


def stage_of(name: str) -> int:
    """The stage number S (from 1) of an attention map's name: 'layer{S}_{B}', 'bam{S}', 'stage{S}_{U}/pw'."""
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


def _maps_of_module(name: str, tree: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """The maps of one top-level module's intermediates, by map name: its own sown maps (BAM) under
    `name`, those of each attention module inside it (SE, CBAM) under `map_name(name, child)`."""
    maps = {name: _find_sown({k: v for k, v in tree.items() if k in SOWN}, {})}
    for child, subtree in tree.items():
        if isinstance(subtree, Mapping):
            maps[map_name(name, child)] = _find_sown(subtree, {})
    return {key: entry for key, entry in maps.items() if entry}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _attention_maps(model: nn.Module, variables: Any, images: jax.Array, resize: bool) -> dict:
    _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
    maps = {}
    for name, subtree in state.get("intermediates", {}).items():
        maps.update(_maps_of_module(name, subtree))
    if resize:
        for entry in maps.values():
            if "spatial" in entry:
                entry["spatial"] = upsample(entry["spatial"], images.shape[1:3])
    return maps


def attention_maps(model: nn.Module, variables: Any, images: jax.Array | np.ndarray, *,
                   resize: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """The attention maps a model computes for preprocessed images (B, H, W, Cin), in eval mode.

    Args:
      model: a `ResNet` (ResNeXts and Wide ResNets included; attention 'cbam', 'bam' or 'se') or a
        `MobileNet` ('cbam' or 'se'); a model without attention gives an empty dict.
      variables: its variables ('params', 'batch_stats').
      images: preprocessed NHWC images.
      resize: upsample spatial maps bilinearly to the input size (H, W); False keeps the feature
        map's resolution.

    Returns:
      {map name: {"channel": (B, C), "spatial": (B, H, W)}} in network order. Map names: 'layer1_0'
      ... for a ResNet's per-block CBAM/SE, 'bam1' ... for BAM, 'stage1_0/dw' and 'stage1_0/pw' ...
      for the attention after a MobileNet unit's depthwise and pointwise convolutions. SE and
      channel-only CBAM have no "spatial" entry. Values are the gates' sigmoids, in [0, 1].
    """
    maps = _attention_maps(model, variables, jnp.asarray(images), resize)
    return {name: {kind: np.asarray(value) for kind, value in maps[name].items()}
            for name in sorted(maps, key=module_order)}


def block_names(model: nn.Module) -> list[str]:
    """The top-level blocks whose output `grad_cam` can explain, in network order: a ResNet's
    residual blocks 'layer1_0' ... (ResNeXts and Wide ResNets too), a MobileNet's depthwise-separable
    units 'stage1_0' ... 'stage5_1'."""
    if isinstance(model, MobileNet):
        return [f"stage{stage}_{unit}" for stage, units in enumerate(model.channels[1:], start=1)
                for unit in range(len(units))]
    if isinstance(model, ResNet):
        return [f"layer{stage}_{block}" for stage, size in enumerate(model.stage_sizes, start=1)
                for block in range(size)]
    raise ValueError(f"grad_cam takes a cbam-jax ResNet or MobileNet; got {type(model).__name__}.")


def last_block_name(model: nn.Module) -> str:
    """The last block of a model (`block_names`), Grad-CAM's default layer: the last residual block
    of a ResNet, e.g. 'layer4_2' for ResNet-50; the last unit 'stage5_1' of a MobileNet."""
    return block_names(model)[-1]


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
      model: a `ResNet` or `MobileNet` with a classification head (num_classes > 0).
      variables: its variables.
      images: preprocessed NHWC images.
      class_index: the class to explain: None (each image's top class), one int for all images, or
        one per image.
      layer: the block whose output is the feature map (default: the last block of the last stage,
        `last_block_name(model)`); any of `block_names(model)`, such as 'layer3_5' in a ResNet or
        'stage4_5' (a MobileNet unit: its output after the pointwise conv and its attention).
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
