"""MobileNet v1 (Howard et al., 2017) with optional SE or CBAM attention (the CBAM paper's Table 5), NHWC.

A 3x3/2 stem conv, then 13 depthwise-separable units (3x3 depthwise conv + BN + ReLU, 1x1
pointwise conv + BN + ReLU) in five stages of 1, 2, 2, 6 and 2 units whose first unit (but
stage 1's) strides 2 on its depthwise conv, then global average pooling and a linear head.
Channels are pytorchcv's: `int(c * width_multiplier)` for c in 32 (stem), 64, 128, 256, 512, 1024.

Attention sits after **every** depthwise and every pointwise conv (after its ReLU): 26 sites. With
reduction 16 this is what reproduces the paper's 5.07 M parameters for SE and CBAM at width 1.0
(after the pointwise convs only: 4.72 M). The official code never published its MobileNet, so the
exact position inside a unit is not known; the parameter count does not depend on it.
BAM is not offered: its placement in a MobileNet is not defined anywhere (the official
repository's issue #19 asks and has no answer), and a guess would not be the paper's model.

The parameter tree: `conv1`, `bn1` (the stem, named as in the ResNets), `stage{S}_{U}/{dw_conv,dw_bn,dw_attention,pw_conv,
pw_bn,pw_attention}` (S from 1, U from 0), `fc`. As a backbone (`features_only`) feature index 0 is
the stem's output and s the output of stage s (strides 2, 2, 4, 8, 16, 32). `cbam_jax.visualize` names
a unit's two attention maps 'stage{S}_{U}/dw' and 'stage{S}_{U}/pw', and its Grad-CAM explains a unit's
output ('stage5_1' by default).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import FrozenDict

from cbam_jax.layers import cpu_ops
from cbam_jax.layers.common import Dtype, check_nhwc, is_int
from cbam_jax.resnet import (
    ATTENTION_LAYERS,
    MODEL_WIDE_OPTIONS,
    FeatureInfo,
    attention_layer,
    attention_options,
    conv_and_norm,
    normalize_out_indices,
)

# Output channels of the stem and of each unit of the five stages, at width multiplier 1.
BASE_CHANNELS: tuple[tuple[int, ...], ...] = ((32,), (64,), (128, 128), (256, 256), (512,) * 6, (1024, 1024))
MOBILENET_ATTENTION = ("se", "cbam")
MOBILENET_STEMS = ("imagenet", "cifar")
# pytorchcv initialises the depthwise kernels with kaiming_normal_(mode='fan_in').
depthwise_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def mobilenet_channels(width_multiplier: float = 1.0, width: int = 32) -> tuple[tuple[int, ...], ...]:
    """Channels of the stem and of each stage's units: int(c * width / 32 * width_multiplier), as pytorchcv.

    E.g. width_multiplier 0.7 (the paper's Table 5): stem 22, last stage 716.
    """
    return tuple(tuple(int(c * width // 32 * width_multiplier) for c in stage) for stage in BASE_CHANNELS)


_PAD3 = ((1, 1), (1, 1))  # explicit PyTorch padding, also at stride 2 (never 'SAME')


class SeparableUnit(nn.Module):
    """3x3 depthwise conv (stride here) + BN + ReLU [+ attention], 1x1 pointwise conv + BN + ReLU
    [+ attention]: (B, H, W, Cin) -> (B, H/s, W/s, channels)."""

    channels: int
    conv: Any
    norm: Any
    attention: Any = None
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        in_channels = x.shape[-1]
        x = self.conv(in_channels, (3, 3), self.strides, padding=_PAD3, feature_group_count=in_channels,
                      kernel_init=depthwise_kernel_init, name="dw_conv")(x)
        x = nn.relu(self.norm(use_running_average=not train, name="dw_bn")(x))
        if self.attention is not None:
            x = self.attention(name="dw_attention")(x, train=train)
        x = self.conv(self.channels, (1, 1), padding="VALID", name="pw_conv")(x)
        x = nn.relu(self.norm(use_running_average=not train, name="pw_bn")(x))
        if self.attention is not None:
            x = self.attention(name="pw_attention")(x, train=train)
        return x


class MobileNet(nn.Module):
    """MobileNet v1 with optional SE or CBAM: (B, H, W, Cin) -> (B, num_classes) float32 logits.

    All fields are plain data, like `ResNet`'s; the BatchNorm, dtype, `implementation`,
    `features_only` and `out_indices` fields mean what they mean there.

    Attributes:
      num_classes: size of the linear head; 0 returns the pooled features (B, channels of the last unit).
      width_multiplier: alpha; channels are int(c * alpha) (1.0, 0.75, 0.7, 0.5, 0.25, ...).
      width: stem channels at alpha 1 (32); every layer scales with width / 32 (small test models).
      stem: 'imagenet' (3x3/2 conv) or 'cifar' (3x3/1 conv, for 32x32 images).
      attention: None, 'se' or 'cbam' after every depthwise and pointwise conv.
      attention_options: keyword arguments of the attention layer (e.g. `reduction`, `pool_order`).
      implementation: 'auto', 'cpu' or 'xla' as `ResNet`'s; on the CPU path the depthwise
        convolutions run in oneDNN too (where it is available, as every convolution there).
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    width: int = 32
    stem: str = "imagenet"
    attention: str | None = None
    attention_options: Mapping[str, Any] = FrozenDict()
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str = "auto"
    features_only: bool = False
    out_indices: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.out_indices is not None:
            object.__setattr__(self, "out_indices", normalize_out_indices(self.out_indices, len(BASE_CHANNELS) - 1))
        object.__setattr__(self, "attention_options", FrozenDict(
            {k: tuple(v) if isinstance(v, list) else v for k, v in self.attention_options.items()}))
        for dtype_field in ("dtype", "param_dtype"):
            object.__setattr__(self, dtype_field, jnp.dtype(getattr(self, dtype_field)))
        if self.stem not in MOBILENET_STEMS:
            raise ValueError(f"MobileNet: unknown stem {self.stem!r}; allowed: {list(MOBILENET_STEMS)}.")
        cpu_ops.use_cpu_path(self.implementation)  # raises for an unknown implementation
        if self.attention is not None:
            if self.attention not in MOBILENET_ATTENTION:
                raise ValueError(f"MobileNet: attention must be None, 'se' or 'cbam' (BAM has no defined place in "
                                 f"a MobileNet); got {self.attention!r}.")
            unknown = sorted(set(self.attention_options) - attention_options(ATTENTION_LAYERS[self.attention]))
            if unknown:
                raise ValueError(f"MobileNet: unknown attention_options {unknown} for attention={self.attention!r} "
                                 f"({', '.join(MODEL_WIDE_OPTIONS)} are set on the MobileNet itself).")
        if isinstance(self.width_multiplier, bool) or not isinstance(self.width_multiplier, (int, float)) \
                or not 0 < self.width_multiplier or min(min(s) for s in self.channels) < 1:
            raise ValueError(f"MobileNet: width_multiplier must be a positive number leaving every layer at least one "
                             f"channel; got {self.width_multiplier!r} (width {self.width!r}).")
        if not is_int(self.width) or self.width < 1:
            raise ValueError(f"MobileNet: width must be a positive integer (32 for the standard MobileNet); "
                             f"got {self.width!r}.")
        if not is_int(self.num_classes) or self.num_classes < 0:
            raise ValueError(f"MobileNet: num_classes must be an integer >= 0 (0 = no head); got {self.num_classes!r}.")
        if not isinstance(self.features_only, bool):
            raise ValueError(f"MobileNet: features_only must be True or False; got {self.features_only!r}.")
        if self.out_indices is not None:
            indices, last = self.out_indices, len(BASE_CHANNELS) - 1
            if (not indices or not all(is_int(i) and 0 <= i <= last for i in indices)
                    or list(indices) != sorted(set(indices))):
                raise ValueError(f"MobileNet: out_indices must be increasing feature indices in 0..{last} (0 = stem, "
                                 f"s = stage s); got {self.out_indices!r}.")
        super().__post_init__()

    @property
    def channels(self) -> tuple[tuple[int, ...], ...]:
        """Output channels of the stem and of each stage's units (`mobilenet_channels`)."""
        return mobilenet_channels(self.width_multiplier, self.width if is_int(self.width) else 32)

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """`out_indices`, or every stage (1, ..., 5) when it is None."""
        return self.out_indices if self.out_indices is not None else tuple(range(1, len(BASE_CHANNELS)))

    @property
    def feature_info(self) -> tuple[FeatureInfo, ...]:
        """Channels and stride of each feature map that `features_only=True` returns, in order."""
        stem_stride = 2 if self.stem == "imagenet" else 1
        strides = [stem_stride, stem_stride] + [stem_stride * 2**s for s in range(1, len(BASE_CHANNELS) - 1)]
        return tuple(FeatureInfo(i, "stem" if i == 0 else f"stage{i}", self.channels[i][-1], strides[i])
                     for i in self.feature_indices)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array | list[jax.Array]:
        """Logits (B, num_classes) in float32 for images `x` (B, H, W, Cin); `train` uses batch statistics.

        With `features_only`: the list of feature maps (B, H / r, W / r, C) of `feature_info`.
        """
        check_nhwc(x, "MobileNet", train)
        _, conv, norm = conv_and_norm(self)
        attention = attention_layer(self) if self.attention is not None else None
        wanted = set(self.feature_indices) if self.features_only else set()
        last_stage = max(self.feature_indices) if self.features_only else len(BASE_CHANNELS) - 1

        x = x.astype(self.dtype)
        x = conv(self.channels[0][0], (3, 3), 2 if self.stem == "imagenet" else 1, padding=_PAD3, name="conv1")(x)
        x = nn.relu(norm(use_running_average=not train, name="bn1")(x))
        x_features = [x] if 0 in wanted else []
        for stage in range(1, last_stage + 1):
            for unit, channels in enumerate(self.channels[stage]):
                x = SeparableUnit(channels, conv=conv, norm=norm, attention=attention,
                                  strides=2 if unit == 0 and stage > 1 else 1, name=f"stage{stage}_{unit}")(x, train)
            if stage in wanted:
                x_features.append(x)
        if self.features_only:
            return x_features
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes == 0:
            return x
        x = nn.Dense(self.num_classes, kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
                     dtype=self.dtype, param_dtype=self.param_dtype, name="fc")(x)
        return x.astype(jnp.float32)
