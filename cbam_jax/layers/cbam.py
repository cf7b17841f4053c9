"""CBAM (Woo et al., ECCV 2018, section 3): channel attention, then spatial attention.

    F'  = M_c(F)  * F     (ChannelGate)
    F'' = M_s(F') * F'    (SpatialGate)

The paper's ablation (Sec. 4.1, Table 3) compares three arrangements of the two gates, all
available through `arrangement`:

    'channel_first'  F'' = M_s(F') * F',  F' = M_c(F) * F    (the paper's CBAM, 22.66% top-1 error)
    'spatial_first'  F'' = M_c(F') * F',  F' = M_s(F) * F    (22.78%)
    'parallel'       F'' = sigmoid(c(F) + s(F)) * F          (22.95%)

(ImageNet, ResNet-50.) In 'parallel' both gates see the same input and c, s are their attention
maps before the sigmoid, (B, 1, 1, C) and (B, H, W, 1), broadcast to one (B, H, W, C) map: the
paper applies the two modules in parallel, adds their outputs and normalises the sum with the
sigmoid, as BAM (Park, Woo et al., BMVC 2018) combines its channel and spatial branches. The
alternatives one might read into "parallel" -- multiplying the two sigmoid maps, or averaging the
two gated maps -- are not what the paper describes: the product of sigmoids is the sequential
arrangement with the spatial map computed from F instead of F'.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.layers.channel_gate import ChannelGate
from cbam_jax.layers.common import Dtype
from cbam_jax.layers.spatial_gate import SpatialGate, check_spatial_options

# The orders of the two gates compared in the paper's Table 3.
ARRANGEMENTS = ("channel_first", "spatial_first", "parallel")


def check_arrangement(arrangement: str, layer: str) -> None:
    """Raise a ValueError unless `arrangement` is one of ARRANGEMENTS."""
    if arrangement not in ARRANGEMENTS:
        raise ValueError(
            f"{layer}: arrangement must be one of {ARRANGEMENTS} ('channel_first' = the paper's CBAM, "
            f"'spatial_first' = the spatial gate first, 'parallel' = sigmoid of the sum of both gates' "
            f"logits, each computed from the input); got {arrangement!r}."
        )


class CBAM(nn.Module):
    """Convolutional Block Attention Module on an NHWC map: (B, H, W, C) -> (B, H, W, C).

    Defaults follow the official code (Jongchan/attention-module); see
    `cbam_jax.registry.VARIANTS` for the timm and common-variant settings.
    Sows `channel/intermediates/channel_attention` (B, C) and
    `spatial/intermediates/spatial_attention` (B, H, W), both in (0, 1), whatever the arrangement:
    each gate's own map (with 'parallel' the applied gate is sigmoid of their logits' sum).

    Options of the spatial gate keep `SpatialGate`'s names where they are unambiguous
    (`kernel_size`, `pool_order`) and are prefixed with 'spatial_' where the channel gate could
    have one of the same name (`spatial_use_bn`, `spatial_descriptor`, ...).

    Attributes:
      reduction, pool_types, mlp_bias: the channel gate's options (see `ChannelGate`).
      kernel_size, pool_order: the spatial gate's conv size and pooled-map order (see `SpatialGate`).
      spatial_use_bn, spatial_bn_momentum, spatial_bn_zero_init: the spatial gate's BatchNorm
        options (`use_bn`, `bn_momentum`, `bn_zero_init` of `SpatialGate`, prefixed with 'spatial_').
      use_spatial: False keeps only the channel gate (the official `no_spatial=True`).
      bn_axis_name: mapped axis for cross-device batch statistics under pmap/shard_map.
      dtype, param_dtype: computation and parameter dtypes.
      implementation: the gates' CPU kernels ('auto', 'cpu', 'xla'; see `SpatialGate`, `ChannelGate`).
      arrangement: 'channel_first' (the paper's CBAM), 'spatial_first' or 'parallel' (module
        docstring); no effect without the spatial gate. Same parameters in all three.
      spatial_descriptor: the spatial gate's `descriptor`: 'pool' (max and mean over channels, the
        paper's CBAM) or 'conv1x1' (a learned 1x1 conv, the paper's Sec. 4.1 alternative; adds
        `spatial/compress/kernel` (1, 1, C, 1) and gives `spatial/conv` one input channel).
    """

    reduction: int = 16
    pool_types: Sequence[str] = ("avg", "max")
    mlp_bias: bool = True
    kernel_size: int = 7
    pool_order: str = "max_mean"
    spatial_use_bn: bool = True
    spatial_bn_momentum: float = 0.99
    spatial_bn_zero_init: bool = True
    use_spatial: bool = True
    bn_axis_name: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    implementation: str = "auto"
    arrangement: str = "channel_first"
    spatial_descriptor: str = "pool"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the channel and spatial gates to `x` (B, H, W, C) in the order of `arrangement`."""
        layer = type(self).__name__
        check_arrangement(self.arrangement, layer)
        check_spatial_options(self.kernel_size, self.pool_order, layer, self.spatial_descriptor, prefix="spatial_")
        channel = ChannelGate(reduction=self.reduction, pool_types=self.pool_types, mlp_bias=self.mlp_bias,
                              dtype=self.dtype, param_dtype=self.param_dtype, implementation=self.implementation,
                              name="channel")
        if not self.use_spatial:
            return channel(x)
        spatial = SpatialGate(kernel_size=self.kernel_size, pool_order=self.pool_order, use_bn=self.spatial_use_bn,
                              bn_momentum=self.spatial_bn_momentum, bn_zero_init=self.spatial_bn_zero_init,
                              bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                              implementation=self.implementation, descriptor=self.spatial_descriptor, name="spatial")
        if self.arrangement == "channel_first":
            return spatial(channel(x), train=train)
        if self.arrangement == "spatial_first":
            return channel(spatial(x, train=train))
        logits = channel(x, return_logits=True) + spatial(x, train=train, return_logits=True)  # (B, H, W, C)
        return x * jax.nn.sigmoid(logits).astype(x.dtype)
