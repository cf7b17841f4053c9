"""What a source layout is: a key map from Flax modules to PyTorch modules, plus tensor layouts.

A layout is data: an ordered list of rules `(flax module template, torch module template, kind)`.
Templates name numeric fields in braces, e.g. `layer{s}_{b}/conv{k}` <-> `layer{s}.{b}.conv{k}`;
a field ending in 1 counts its namesake from 1 (`{b1}` = b + 1: pytorchcv's `unit1`, `unit2`, ...). The *kind*
says which tensors a module has and how each is stored in both frameworks.
"""

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def _swap_last_two(x: np.ndarray) -> np.ndarray:
    return x.T


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One tensor of a module: its PyTorch name and the transforms between the two layouts."""

    torch_name: str
    to_flax: Transform = _identity
    to_torch: Transform = _identity


@dataclasses.dataclass(frozen=True)
class Kind:
    """A module type: Flax leaf name -> Tensor; `norm` kinds also carry `num_batches_tracked`."""

    name: str
    tensors: Mapping[str, Tensor]
    norm: bool = False


# Conv2d weight (O, I, kh, kw) <-> Flax Conv kernel (kh, kw, I, O); both are cross-correlations.
CONV = Kind("conv", {
    "kernel": Tensor("weight", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
    "bias": Tensor("bias"),
})
# Linear weight (O, I) <-> Dense kernel (I, O).
LINEAR = Kind("linear", {"kernel": Tensor("weight", _swap_last_two, _swap_last_two), "bias": Tensor("bias")})
# A 1x1 Conv2d used as a Linear on pooled (B, C, 1, 1) maps (timm, the common variant): (O, I, 1, 1) <-> (I, O).
POINTWISE = Kind("pointwise", {
    "kernel": Tensor("weight", lambda w: w[:, :, 0, 0].T, lambda k: k.T[:, :, None, None]),
    "bias": Tensor("bias"),
})
# BatchNorm: affine parameters in 'params', running statistics in 'batch_stats'.
NORM = Kind("norm", {
    "scale": Tensor("weight"), "bias": Tensor("bias"),
    "mean": Tensor("running_mean"), "var": Tensor("running_var"),
}, norm=True)

NUM_BATCHES_TRACKED = "num_batches_tracked"
# template field -> the zero-based field it counts from 1 (pytorchcv counts units, stages and convs from 1)
ONE_BASED_FIELDS = {"b1": "b", "i1": "i", "d1": "d"}

Rule = tuple[str, str, Kind]


def _template_regex(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(pieces)))


def _fields(match: re.Match[str]) -> dict[str, int]:
    fields = {name: int(value) for name, value in match.groupdict().items()}
    for one_based, zero_based in ONE_BASED_FIELDS.items():
        if one_based in fields:
            fields[zero_based] = fields[one_based] - 1
        if zero_based in fields:
            fields[one_based] = fields[zero_based] + 1
    return fields


@dataclasses.dataclass(frozen=True)
class Layout:
    """The state_dict layout of one PyTorch source.

    Attributes:
      name: short name ('official', 'timm', ...).
      variant: the `cbam_jax.registry.VARIANTS` entry whose models this layout holds exactly.
      description: where such checkpoints come from (one line, for messages).
      signature: regex; a state_dict with a key matching it has this layout (checked in order).
      rules: (Flax module template, torch module template, kind), first match wins.
      attention_overrides: attention-layer options that differ from the variant's preset
        (training-only settings such as a BatchNorm momentum).
    """

    name: str
    variant: str
    description: str
    signature: str
    rules: tuple[Rule, ...]
    attention_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        compiled = tuple((_template_regex(f), f, _template_regex(t), t, kind) for f, t, kind in self.rules)
        object.__setattr__(self, "_compiled", compiled)

    def torch_module(self, flax_module: str) -> tuple[str, Kind] | None:
        """The torch module path and kind of a Flax module path ('layer1_0/conv1'), or None."""
        for flax_regex, _, _, torch_template, kind in self._compiled:
            match = flax_regex.fullmatch(flax_module)
            if match:
                return torch_template.format(**_fields(match)), kind
        return None

    def flax_module(self, torch_module: str) -> tuple[str, Kind] | None:
        """The Flax module path and kind of a torch module path ('layer1.0.conv1'), or None."""
        for _, flax_template, torch_regex, _, kind in self._compiled:
            match = torch_regex.fullmatch(torch_module)
            if match:
                return flax_template.format(**_fields(match)), kind
        return None

    def matches(self, keys: list[str]) -> bool:
        """Whether any of the state_dict `keys` carries this layout's signature."""
        signature = re.compile(self.signature)
        return any(signature.search(key) for key in keys)
