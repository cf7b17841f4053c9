"""ResNets with optional attention (CBAM paper, section 4 and Fig. 3), NHWC.

Per-block attention (SE, CBAM) gates the residual branch after its last BatchNorm and before the
addition, so the identity path is untouched:

    out = relu(shortcut(x) + attention(bn_last(conv_last(...))))

BAM instead sits once after each of the first three stages. Numerics follow PyTorch: explicit
symmetric padding on every conv and pool (never 'SAME', which pads stride-2 layers
asymmetrically), BatchNorm epsilon 1e-5 and Flax momentum 0.9 (PyTorch momentum 0.1), stride on
the 3x3 conv of the bottleneck (torchvision's "v1.5").

The parameter tree mirrors torchvision's names: `conv1`, `bn1`, `layer{S}_{B}/{conv1,bn1,...,
downsample_conv,downsample_bn,attention}`, `bam{S}`, `fc`.

As a backbone (`features_only=True`) the model returns the outputs of the stem and of the stages
chosen by `out_indices` (timm's numbering: 0 = the stem's ReLU, before the max pool; s = stage s)
instead of logits, and `feature_info` says their channels and strides. The parameters keep their
names, minus the head and the stages after the last output, so classifier weights load as they are.
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.core import FrozenDict

from cbam_jax.layers import BAM, CBAM, SE, cpu_ops
from cbam_jax.layers.common import (
    Dtype,
    check_nhwc,
    conv_kernel_init,
    is_int,
    promote_to_float32,
    torch_default_kernel_init,
)
from cbam_jax.layers.remat import recompute_in_backward

ModuleDef = Any

# Per-block attention layers; 'bam' is per stage (see ResNet).
ATTENTION_LAYERS: dict[str, type[nn.Module]] = {"se": SE, "cbam": CBAM, "bam": BAM}
STEMS = ("imagenet", "cifar")
REMAT_CHOICES = ("none", "blocks")  # ResNet.remat
# ResNet fields that its attention layers take from it (when they have such a field).
MODEL_WIDE_OPTIONS = ("dtype", "param_dtype", "bn_axis_name", "bn_momentum", "bn_epsilon", "implementation")


def _pad(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch-style symmetric padding k // 2 on H and W."""
    return ((kernel_size // 2,) * 2,) * 2


class ResidualBlock(nn.Module):
    """What BasicBlock and Bottleneck share: their options and the end of the block (`attend_and_add`)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    attention: ModuleDef | None = None
    zero_init_last: bool = False
    materialize_output: bool = False  # an XLA optimisation barrier on the output (the CPU fast path)
    groups: int = 1  # cardinality of the bottleneck's 3x3 conv (ResNeXt)
    base_width: int = 64  # the bottleneck's inner width per group at `filters` = 64 (ResNeXt, Wide ResNet)
    expansion: ClassVar[int] = 1

    def last_norm(self, train: bool, name: str) -> nn.Module:
        """The branch's last BatchNorm; its scale starts at 0 with `zero_init_last` (timm)."""
        scale_init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        return self.norm(use_running_average=not train, scale_init=scale_init, name=name)

    def attend_and_add(self, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
        """Attention on the residual branch `y`, the shortcut of `x`, the addition and the final ReLU."""
        if self.attention is not None:
            y = self.attention(name="attention")(y, train=train)
        out_channels = self.filters * self.expansion
        shortcut = x
        if self.strides != 1 or x.shape[-1] != out_channels:
            # The official code leaves this 1x1 conv at PyTorch's default initialisation.
            shortcut = self.conv(out_channels, (1, 1), self.strides, padding="VALID",
                                 kernel_init=torch_default_kernel_init, name="downsample_conv")(x)
            shortcut = self.norm(use_running_average=not train, name="downsample_bn")(shortcut)
        out = nn.relu(shortcut + y)
        # The block output feeds the next block's convolutions and its shortcut. Without a barrier
        # XLA:CPU fuses this elementwise tail (BN, gates, add, ReLU) into several consumers and
        # recomputes it there, chaining through the blocks of a stage (one fusion recomputed three
        # blocks' tails): 17-23% of a ResNet-50 training step on 2 cores.
        return jax.lax.optimization_barrier(out) if self.materialize_output else out


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (stride on the first), for ResNet-18/34. (B, H, W, Cin) -> (B, H/s, W/s, filters)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(self.norm, use_running_average=not train)
        y = self.conv(self.filters, (3, 3), self.strides, padding=_pad(3), name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = self.conv(self.filters, (3, 3), padding=_pad(3), name="conv2")(y)
        y = self.last_norm(train, "bn2")(y)
        return self.attend_and_add(x, y, train)


def bottleneck_inner_width(filters: int, groups: int = 1, base_width: int = 64) -> int:
    """Channels of a bottleneck's 3x3 conv, as torchvision, timm and pytorchcv compute them:
    `filters` for a ResNet, 128 for ResNeXt 32x4d or Wide ResNet-50-2 at `filters` = 64."""
    return int(filters * (base_width / 64.0)) * groups


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (stride here; grouped for ResNeXt), 1x1 expand x4, for ResNet-50/101/152.

    The inner width is `bottleneck_inner_width(filters, groups, base_width)`: `filters` for a
    ResNet, doubled for a Wide ResNet (base_width 128), cardinality x group width for a ResNeXt.

    (B, H, W, Cin) -> (B, H/s, W/s, 4 * filters).
    """

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        norm = functools.partial(self.norm, use_running_average=not train)
        inner = bottleneck_inner_width(self.filters, self.groups, self.base_width)
        y = self.conv(inner, (1, 1), padding="VALID", name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = self.conv(inner, (3, 3), self.strides, padding=_pad(3), feature_group_count=self.groups,
                      name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = self.conv(self.filters * self.expansion, (1, 1), padding="VALID", name="conv3")(y)
        y = self.last_norm(train, "bn3")(y)
        return self.attend_and_add(x, y, train)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class FeatureInfo(NamedTuple):
    """One output of a backbone: where it is taken, its channels and its stride (`reduction`) in pixels."""

    index: int  # 0 = stem, s = stage s (timm's out_indices)
    module: str  # 'stem' or 'layer{s}' (after 'bam{s}' in BAM-ResNets, which refines the stage output)
    channels: int
    reduction: int


class ResNet(nn.Module):
    """A ResNet with optional SE, CBAM or BAM attention: (B, H, W, Cin) -> (B, num_classes) float32 logits.

    All fields are plain data (JSON-friendly), so a model is rebuilt from its config alone.
    With `num_classes=0` the model returns the pooled features (B, width * 8 * expansion).

    Attributes:
      stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
      block: 'basic' (ResNet-18/34) or 'bottleneck' (ResNet-50/101/152).
      num_classes: size of the linear head; 0 for no head.
      stem: 'imagenet' (7x7/2 conv + 3x3/2 max-pool) or 'cifar' (3x3/1 conv, no pool).
      attention: None, 'se', 'cbam' (in every block) or 'bam' (after stages 1-3).
      attention_options: keyword arguments of the attention layer (e.g. `pool_order`).
      width: channels of the stem and of the first stage (64); stage s has width * 2**s (times the
        expansion) unless `stage_widths` says otherwise.
      groups: cardinality of the bottleneck's 3x3 convolution (ResNeXt: 32 or 64; 1 for ResNets).
      base_width: the bottleneck's inner width per group for a stage of width 64 (torchvision's
        `width_per_group`): 64 for ResNets, 128 for Wide ResNet-50-2/101-2, 4 or 8 for ResNeXt
        32x4d / 32x8d. Basic blocks need groups 1 and base_width 64.
      stage_widths: the width of each stage (before the bottleneck's expansion), e.g.
        (96, 192, 384, 768) for the CBAM paper's WideResNet-18 (widen 1.5), whose stem stays at
        `width`; None = width * 2**s.
      zero_init_residual: start each block's last BatchNorm scale at 0 (timm), not 1 (official).
      bn_momentum, bn_epsilon: BatchNorm settings (Flax momentum 0.9 = PyTorch momentum 0.1).
      bn_axis_name: mapped axis name for cross-device batch statistics under pmap/shard_map;
        leave None under jit with sharded inputs (statistics are then global already).
      dtype: computation dtype (e.g. jnp.bfloat16); BatchNorm statistics, attention pooling and
        sigmoids and the returned logits are float32.
      param_dtype: parameter dtype.
      implementation: 'auto' (the CPU fast path on the CPU backend: `cbam_jax.layers.cpu_ops`'s
        convolution, BatchNorm and stem max pool, and block outputs materialised behind an
        optimisation barrier; XLA's own kernels elsewhere), 'cpu' or 'xla'. Same parameters and
        results either way.
      features_only: return the list of feature maps chosen by `out_indices` (NHWC, in `dtype`)
        instead of logits; the head and the stages after the last chosen one are not built.
        `num_classes` is then ignored.
      out_indices: which feature maps (increasing): 0 = stem output, s = output of stage s;
        None = every stage (1, ..., len(stage_sizes)); an integer n = the last n of them (timm's
        meaning: 3 = (2, 3, 4) for four stages). NumPy integers are accepted. See `feature_info`.
      remat: 'none', or 'blocks' to recompute each residual block in the backward pass instead of
        keeping its activations (`cbam_jax.layers.remat`): only block inputs stay alive between
        the forward and backward passes, so a training step's peak memory falls (CBAM-ResNet-50:
        benchmarks/results/memory.json) for about one more forward pass of compute. Same
        parameters, results and gradients; no forward-mode differentiation (jvp) through it.
    """

    stage_sizes: Sequence[int]
    block: str = "bottleneck"
    num_classes: int = 1000
    stem: str = "imagenet"
    attention: str | None = None
    attention_options: Mapping[str, Any] = FrozenDict()
    width: int = 64
    groups: int = 1
    base_width: int = 64
    stage_widths: Sequence[int] | None = None
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "auto"
    features_only: bool = False
    out_indices: Sequence[int] | None = None
    remat: str = "none"

    def __post_init__(self) -> None:
        # Fail at construction, before any tracing, on an invalid configuration; keep the fields
        # hashable (lists from JSON or a command line become tuples) so that the module can be a
        # static argument of jax.jit.
        object.__setattr__(self, "stage_sizes", tuple(self.stage_sizes))
        if self.out_indices is not None:
            object.__setattr__(self, "out_indices", normalize_out_indices(self.out_indices, len(self.stage_sizes)))
        if self.stage_widths is not None:
            object.__setattr__(self, "stage_widths", tuple(self.stage_widths))
        object.__setattr__(self, "attention_options", FrozenDict(
            {k: tuple(v) if isinstance(v, list) else v for k, v in self.attention_options.items()}))
        for dtype_field in ("dtype", "param_dtype"):
            object.__setattr__(self, dtype_field, jnp.dtype(getattr(self, dtype_field)))
        _check_choice("block", self.block, BLOCKS)
        _check_choice("stem", self.stem, STEMS)
        _check_choice("implementation", self.implementation, cpu_ops.IMPLEMENTATIONS)
        _check_choice("remat", self.remat, REMAT_CHOICES)
        if self.attention is not None:
            _check_choice("attention", self.attention, ATTENTION_LAYERS)
            allowed = attention_options(ATTENTION_LAYERS[self.attention])
            unknown = sorted(set(self.attention_options) - allowed)
            if unknown:
                raise ValueError(f"ResNet: unknown attention_options {unknown} for attention={self.attention!r}; "
                                 f"allowed: {sorted(allowed)} ({', '.join(MODEL_WIDE_OPTIONS)} are set on the "
                                 "ResNet itself).")
        if not self.stage_sizes or not all(is_int(n) and n >= 1 for n in self.stage_sizes):
            raise ValueError(f"ResNet: stage_sizes must be positive block counts; got {self.stage_sizes!r}.")
        if self.attention == "bam" and len(self.stage_sizes) < 2:
            raise ValueError("ResNet: BAM sits between stages and needs at least two stages.")
        if not is_int(self.width) or self.width < 1:
            raise ValueError(f"ResNet: width must be a positive integer (64 for the standard ResNets); got {self.width!r}.")
        for field in ("groups", "base_width"):
            if not is_int(getattr(self, field)) or getattr(self, field) < 1:
                raise ValueError(f"ResNet: {field} must be a positive integer; got {getattr(self, field)!r}.")
        if self.block == "basic" and (self.groups != 1 or self.base_width != 64):
            raise ValueError(f"ResNet: basic blocks have no grouped or widened inner conv (groups 1, base_width 64); "
                             f"got groups={self.groups!r}, base_width={self.base_width!r}. Use block='bottleneck', "
                             "or stage_widths to widen a basic-block ResNet.")
        if self.stage_widths is not None and (len(self.stage_widths) != len(self.stage_sizes) or not all(
                is_int(w) and w >= 1 for w in self.stage_widths)):
            raise ValueError(f"ResNet: stage_widths must be one positive width per stage ({len(self.stage_sizes)}); "
                             f"got {self.stage_widths!r}.")
        if self.block == "bottleneck" and is_int(self.width) and self.width >= 1 and bottleneck_inner_width(
                self.stage_width(0), self.groups, self.base_width) < 1:
            raise ValueError(f"ResNet: width {self.stage_width(0)} leaves the first stage's bottleneck no channels with "
                             f"base_width={self.base_width} (int(width * base_width / 64) * groups); use a width >= "
                             f"{-(-64 // self.base_width)}.")
        if not is_int(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"ResNet: num_classes must be an integer >= 0 (0 = no head); got {self.num_classes!r}.")
        if not isinstance(self.features_only, bool):
            raise ValueError(f"ResNet: features_only must be True or False; got {self.features_only!r}.")
        if self.out_indices is not None:
            indices, last = self.out_indices, len(self.stage_sizes)
            if (not indices or not all(is_int(i) and 0 <= i <= last for i in indices)
                    or list(indices) != sorted(set(indices))):
                raise ValueError(f"ResNet: out_indices must be increasing feature indices in 0..{last} (0 = stem, "
                                 f"s = stage s), e.g. (1, 2, 3, 4); got {self.out_indices!r}.")
        super().__post_init__()

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """`out_indices`, or every stage (1, ..., number of stages) when it is None."""
        return self.out_indices if self.out_indices is not None else tuple(range(1, len(self.stage_sizes) + 1))

    def stage_width(self, stage: int) -> int:
        """The width (`filters`, before the bottleneck's expansion) of stage `stage` (counted from 0)."""
        return self.stage_widths[stage] if self.stage_widths is not None else self.width * 2**stage

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """Channels and stride of each feature map that `features_only=True` returns, in order.

        E.g. ResNet-50, ImageNet stem, out_indices (1, 2, 3, 4): channels 256/512/1024/2048 at
        strides 4/8/16/32 (the CIFAR stem: 1/2/4/8); index 0, the stem, has `width` channels at
        stride 2 (1).
        """
        stem_stride = 2 if self.stem == "imagenet" else 1
        first_stage_stride = 2 * stem_stride if self.stem == "imagenet" else 1  # the max pool
        expansion = BLOCKS[self.block].expansion
        info = []
        for index in self.feature_indices:
            if index == 0:
                info.append(FeatureInfo(0, "stem", self.width, stem_stride))
            else:
                info.append(FeatureInfo(index, f"layer{index}", self.stage_width(index - 1) * expansion,
                                        first_stage_stride * 2 ** (index - 1)))
        return tuple(info)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
        """Logits (B, num_classes) in float32 for images `x` (B, H, W, Cin); `train` uses batch statistics.

        With `features_only`: the list of feature maps (B, H / r, W / r, C) for `feature_info`'s
        channels C and reductions r (rounded up at odd sizes, like PyTorch), in `dtype`.
        """
        check_nhwc(x, "ResNet", train)
        if x.shape[1] in (1, 3) and x.shape[-1] not in (1, 3, 4) and x.shape[-1] > x.shape[1]:
            raise ValueError(f"ResNet expects NHWC images; shape {tuple(x.shape)} looks like NCHW. "
                             "Transpose with x.transpose(0, 2, 3, 1).")
        cpu_path, conv, norm = conv_and_norm(self)
        block_attention, stage_attention = None, None
        if self.attention is not None:
            layer = attention_layer(self)
            if self.attention == "bam":
                stage_attention = layer
            else:
                block_attention = layer

        wanted = set(self.feature_indices) if self.features_only else set()
        features = []
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name="conv1")(x)
            x = nn.relu(norm(use_running_average=not train, name="bn1")(x))
            if 0 in wanted:
                features.append(x)
            if cpu_path:
                x = cpu_ops.max_pool(x, 3, 2, 1)
            else:
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))  # pads with -inf, like PyTorch
        else:
            x = conv(self.width, (3, 3), padding=_pad(3), name="conv1")(x)
            x = nn.relu(norm(use_running_average=not train, name="bn1")(x))
            if 0 in wanted:
                features.append(x)

        block_cls = BLOCKS[self.block]
        # A backbone stops after its last output: later stages would be unused parameters.
        num_stages = max(self.feature_indices) if self.features_only else len(self.stage_sizes)
        for stage, num_blocks in enumerate(self.stage_sizes[:num_stages]):
            for index in range(num_blocks):
                block = block_cls(filters=self.stage_width(stage), conv=conv, norm=norm,
                                  groups=self.groups, base_width=self.base_width,
                                  strides=2 if stage > 0 and index == 0 else 1,
                                  attention=block_attention, zero_init_last=self.zero_init_residual,
                                  materialize_output=cpu_path, name=f"layer{stage + 1}_{index}")
                x = recompute_in_backward(block, x, train) if self.remat == "blocks" else block(x, train=train)
            if stage_attention is not None and stage < min(3, len(self.stage_sizes) - 1):
                x = stage_attention(name=f"bam{stage + 1}")(x, train=train)
            if stage + 1 in wanted:
                features.append(x)
        if self.features_only:
            return features

        x = jnp.mean(promote_to_float32(x), axis=(1, 2))  # global average pool
        if self.num_classes == 0:
            return x
        # The official code: kaiming_normal_ (fan_in) on the head weight, bias 0.
        x = nn.Dense(self.num_classes, kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return promote_to_float32(x)


def conv_and_norm(model: nn.Module) -> tuple[bool, ModuleDef, ModuleDef]:
    """(whether the CPU fast path is taken, conv factory, BatchNorm factory) for a model with the
    fields `implementation`, `dtype`, `param_dtype`, `bn_momentum`, `bn_epsilon`, `bn_axis_name`.

    Convolutions are bias-free, PyTorch-initialised (kaiming fan_out) and, on the CPU path, run by
    `cpu_ops.conv_general_dilated`, which hands grouped and depthwise convolutions
    (`feature_group_count` > 1) to XLA's own convolution: oneDNN's kernels there cover one group only.
    """
    cpu_path = cpu_ops.use_cpu_path(model.implementation)
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init,
                             conv_general_dilated=cpu_ops.conv_general_dilated if cpu_path else None,
                             dtype=model.dtype, param_dtype=model.param_dtype)
    norm_cls = cpu_ops.BatchNorm if cpu_path else nn.BatchNorm
    norm = functools.partial(norm_cls, momentum=model.bn_momentum, epsilon=model.bn_epsilon,
                             use_fast_variance=False, axis_name=model.bn_axis_name,
                             dtype=model.dtype, param_dtype=model.param_dtype)
    return cpu_path, conv, norm


def attention_layer(model: nn.Module) -> ModuleDef:
    """The attention layer factory of a model with `attention` and `attention_options`, given the
    model-wide options (`MODEL_WIDE_OPTIONS`) the layer has."""
    layer_cls = ATTENTION_LAYERS[model.attention]
    shared = {k: getattr(model, k) for k in MODEL_WIDE_OPTIONS if k in layer_options(layer_cls)}
    return functools.partial(layer_cls, **model.attention_options, **shared)


def normalize_out_indices(out_indices: int | Sequence[int], num_stages: int) -> tuple[int, ...] | Any:
    """`out_indices` as a tuple of Python ints: an integer n means the last n feature levels of
    0 (stem), 1, ..., `num_stages` (timm's convention); a sequence is kept (its NumPy integers made
    ints). Values that are not integers are left for the model's own check to report."""
    if is_int(out_indices):
        count = int(out_indices)
        if not 1 <= count <= num_stages + 1:
            raise ValueError(f"out_indices = {count} asks for the last {count} of {num_stages + 1} feature levels "
                             f"(stem and {num_stages} stages); give 1..{num_stages + 1}.")
        return tuple(range(num_stages + 1 - count, num_stages + 1))
    if isinstance(out_indices, (str, bytes)) or not isinstance(out_indices, Sequence | jax.Array | np.ndarray):
        return out_indices
    return tuple(int(i) if is_int(i) else i for i in (out_indices.tolist() if hasattr(out_indices, "tolist")
                                                         else out_indices))


def layer_options(layer_cls: type[nn.Module]) -> set[str]:
    """The constructor options of a Linen layer class (its dataclass fields but parent and name)."""
    return {f.name for f in dataclasses.fields(layer_cls)} - {"parent", "name"}


def attention_options(layer_cls: type[nn.Module]) -> set[str]:
    """The options of an attention layer that a ResNet's `attention_options` may set: plain-data
    options only (no initialisers), and not the model-wide ones the ResNet passes down itself."""
    return layer_options(layer_cls) - set(MODEL_WIDE_OPTIONS) - {"kernel_init"}


def _check_choice(field: str, value: Any, allowed: Mapping[str, Any] | Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"ResNet: unknown {field} {value!r}; allowed: {sorted(allowed)}.")
