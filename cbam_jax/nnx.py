"""Flax NNX versions of every cbam-jax model and layer.

    import cbam_jax.nnx
    from flax import nnx

    model = cbam_jax.nnx.create_model("cbam_resnet50", num_classes=1000, rngs=nnx.Rngs(0))
    model.eval()
    logits = model(images)                 # images (B, H, W, 3) float32 -> (B, 1000)
    model.train()                          # batch statistics, running averages updated in place
    optimizer = nnx.Optimizer(model, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)

One implementation of the math: an NNX module here is a `Bridged` module that holds the Linen
module (`cbam_jax.ResNet`, `cbam_jax.CBAM`, ...) inside `flax.nnx.bridge.ToNNX` with its variables
as NNX `Param`s and `BatchStat`s, and runs the Linen code on them. Every option of the Linen
layers (present and future) is therefore available unchanged, and NNX and Linen give the same
numbers. The variables mirror the Linen tree (`model.linen.layer1_0['conv1']['kernel']`), so
converted and pretrained weights load directly (`from_linen`, `load_pretrained`) and go back with
`linen_variables()`. Why a bridge rather than native `nnx.Conv`/`nnx.BatchNorm` modules (measured
step times, and how each reads in `nnx.display`): README, section "NNX".
"""

from collections.abc import Mapping
from os import PathLike
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.core import unfreeze
from flax.nnx.bridge import variables as bridge_variables

from cbam_jax import factory, layers, registry
from cbam_jax.resnet import ResNet

# Variable collections of the models: trained parameters and BatchNorm running statistics.
COLLECTIONS = ("params", "batch_stats")
# Spatial size of the dummy input that creates the variables (their shapes do not depend on it).
INIT_SIZE = 32


class Bridged(nnx.Module):
    """A cbam-jax Linen module with its variables, as an NNX module: (B, H, W, C) -> the Linen output.

    `model.train()` / `model.eval()` switch between batch statistics (and running-average updates,
    as `nnx.BatchNorm`) and running averages; a new module starts in eval mode.

    Attributes:
      linen: the `nnx.bridge.ToNNX` wrapper; its attributes are the Linen module's top-level
        submodules, e.g. `linen.conv1['kernel']` (an `nnx.Param`), `linen.bn1['mean']` (an `nnx.BatchStat`).
      use_running_average: True in eval mode.
    """

    def __init__(self, module: nn.Module, variables: Mapping[str, Any], *, use_running_average: bool = True):
        """Wrap `module` with `variables` ({'params': ..., 'batch_stats': ...}, e.g. from `module.init`)."""
        unknown = sorted(set(variables) - set(COLLECTIONS))
        if unknown or "params" not in variables:
            raise ValueError(f"Bridged: variables must hold 'params' (and 'batch_stats'); got collections "
                             f"{sorted(variables)}.")
        self.linen = nnx.bridge.ToNNX(module)
        for name, value in bridge_variables.linen_vars_to_nnx_attrs(unfreeze(dict(variables))).items():
            setattr(self.linen, name, nnx.data(value))
        self.use_running_average = use_running_average

    @property
    def linen_module(self) -> nn.Module:
        """The Linen module whose code runs (`linen_module.apply(linen_variables(), x)` gives the same output)."""
        return self.linen.to_nnx__module

    def __call__(self, x: jax.Array, *, use_running_average: bool | None = None) -> jax.Array:
        """Run the Linen module on `x` (B, H, W, C); in training mode its BatchNorm running averages
        are updated in place. `use_running_average` overrides the mode for this call."""
        if use_running_average is None:
            use_running_average = self.use_running_average
        train = not use_running_average
        return self.linen(x, train=train, mutable=["batch_stats"] if train else False)

    def linen_variables(self) -> dict[str, Any]:
        """The variables as Linen wants them: {'params': ..., 'batch_stats': ...} of arrays."""
        variables = bridge_variables.nnx_attrs_to_linen_vars(
            {name: value for name, value in vars(self.linen).items() if not name.startswith(("to_nnx__", "_pytree__"))})
        return {name: unfreeze(variables[name]) for name in COLLECTIONS if name in variables}


def from_linen(module: nn.Module, variables: Mapping[str, Any]) -> Bridged:
    """An NNX module from a Linen module and its variables (converted, pretrained or trained with Linen);
    the arrays are shared, not copied."""
    return Bridged(module, {name: variables[name] for name in COLLECTIONS if name in variables})


def init_linen(module: nn.Module, rngs: nnx.Rngs, in_channels: int) -> dict[str, Any]:
    """Fresh variables of a Linen module for inputs of `in_channels` channels (one compiled `init`)."""
    dummy = jnp.zeros((1, INIT_SIZE, INIT_SIZE, in_channels), jnp.float32)
    variables = jax.jit(module.init)(rngs.params(), dummy)
    return {name: unfreeze(variables[name]) for name in COLLECTIONS if name in variables}


def create_model(name: str, *, rngs: nnx.Rngs, in_channels: int = 3, **kwargs: Any) -> Bridged:
    """A registered model (`cbam_jax.list_models()`) as a freshly initialised NNX module.

    Args:
      name: e.g. 'cbam_resnet50'.
      rngs: NNX random streams; the 'params' stream initialises the weights.
      in_channels: input channels (3 for RGB, 1 for greyscale).
      **kwargs: everything `cbam_jax.create_model` takes (num_classes, stem, variant, dtype,
        attention options, ...).
    """
    module = registry.create_model(name, **kwargs)
    return from_linen(module, init_linen(module, rngs, in_channels))


def resnet(*, rngs: nnx.Rngs, in_channels: int = 3, **fields: Any) -> Bridged:
    """A `cbam_jax.ResNet` with any fields (stage_sizes, block, attention, ...) as an NNX module."""
    module = ResNet(**fields)
    return from_linen(module, init_linen(module, rngs, in_channels))


def layer(kind: str, in_channels: int, *, rngs: nnx.Rngs, **options: Any) -> Bridged:
    """An attention layer as an NNX module: `layer('cbam', 64, rngs=nnx.Rngs(0), reduction=16)`.

    Args:
      kind: 'cbam', 'channel_gate', 'spatial_gate', 'se' or 'bam' (`LAYERS`).
      in_channels: channels C of the NHWC maps it will gate.
      rngs: NNX random streams ('params' initialises the weights).
      **options: the Linen layer's options (see `cbam_jax.layers`).
    """
    if kind not in LAYERS:
        raise ValueError(f"Unknown layer {kind!r}; available: {sorted(LAYERS)}.")
    module = LAYERS[kind](**options)
    return from_linen(module, init_linen(module, rngs, in_channels))


def load_pretrained(path: str | PathLike) -> Bridged:
    """A `save_pretrained` / `cbam-jax convert` folder or an 'hf-hub:ORG/NAME' id as an NNX module (in eval mode);
    `cbam_jax.pretrained.load_metadata(path)` has its class names and preprocessing."""
    return from_linen(*factory.load_pretrained(path))


LAYERS: dict[str, type[nn.Module]] = {
    "cbam": layers.CBAM, "channel_gate": layers.ChannelGate, "spatial_gate": layers.SpatialGate,
    "se": layers.SE, "bam": layers.BAM,
}
