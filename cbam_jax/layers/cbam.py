"""CBAM (Woo et al., ECCV 2018, section 3): channel attention, then spatial attention.

    F'  = M_c(F)  * F     (ChannelGate)
    F'' = M_s(F') * F'    (SpatialGate)

The paper's ablation found this sequential channel-first arrangement best (22.66% top-1 error on
ImageNet ResNet-50, vs 22.78% spatial-first and 22.95% parallel).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.layers.channel_gate import ChannelGate
from cbam_jax.layers.common import Dtype, renamed_option_value
from cbam_jax.layers.spatial_gate import SpatialGate


class CBAM(nn.Module):
    """Convolutional Block Attention Module on an NHWC map: (B, H, W, C) -> (B, H, W, C).

    Defaults follow the official code (Jongchan/attention-module); see
    `cbam_jax.registry.VARIANTS` for the timm and common-variant settings.
    Sows `channel/intermediates/channel_attention` (B, C) and
    `spatial/intermediates/spatial_attention` (B, H, W), both in (0, 1).

    Attributes:
      reduction, pool_types, mlp_bias: the channel gate's options (see `ChannelGate`).
      kernel_size, pool_order: the spatial gate's conv size and pooled-map order (see `SpatialGate`).
      spatial_use_bn, spatial_bn_momentum, spatial_bn_zero_init: the spatial gate's BatchNorm
        options (`use_bn`, `bn_momentum`, `bn_zero_init` of `SpatialGate`, prefixed with 'spatial_').
      use_spatial: False keeps only the channel gate (the official `no_spatial=True`).
      bn_axis_name: mapped axis for cross-device batch statistics under pmap/shard_map.
      dtype, param_dtype: computation and parameter dtypes.
      implementation: the gates' CPU kernels ('auto', 'cpu', 'xla'; see `SpatialGate`, `ChannelGate`).
      spatial_bn, kernels: deprecated names of `spatial_use_bn` and `implementation`.
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
    spatial_bn: bool | None = None  # deprecated: `spatial_use_bn`
    kernels: str | None = None  # deprecated: `implementation`

    def __post_init__(self) -> None:
        renamed_option_value(self, "spatial_bn")
        renamed_option_value(self, "kernels")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply channel then spatial attention to `x` (B, H, W, C)."""
        x = ChannelGate(reduction=self.reduction, pool_types=self.pool_types, mlp_bias=self.mlp_bias,
                        dtype=self.dtype, param_dtype=self.param_dtype, implementation=self.implementation,
                        name="channel")(x)
        if self.use_spatial:
            x = SpatialGate(kernel_size=self.kernel_size, pool_order=self.pool_order, use_bn=self.spatial_use_bn,
                            bn_momentum=self.spatial_bn_momentum, bn_zero_init=self.spatial_bn_zero_init,
                            bn_axis_name=self.bn_axis_name, dtype=self.dtype, param_dtype=self.param_dtype,
                            implementation=self.implementation, name="spatial")(x, train=train)
        return x
