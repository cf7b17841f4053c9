"""Spatial attention (CBAM paper, section 3, Eq. 3): where to look.

    M_s(F) = sigmoid( BN( conv_kxk( [pool_a(F); pool_b(F)] ) ) )

The two maps pooled over channels are stacked in a source-dependent order: the official code
puts MAX first, timm and the paper MEAN first. The official code and timm normalise the conv
output with a one-channel BatchNorm (not in the paper's equation); the common variant does not.
"""

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.layers import cpu_ops
from cbam_jax.layers.common import (
    Dtype,
    check_nhwc,
    conv_kernel_init,
    is_int,
    max_over,
    promote_to_float32,
    renamed_option_value,
)

# Pools over the channel axis of an NHWC map: (B, H, W, C) -> (B, H, W).
CHANNEL_POOLS = {"max": lambda x: max_over(x, -1), "mean": lambda x: jnp.mean(x, axis=-1)}
# pool_order -> the pools in the order of the conv's input channels.
POOL_ORDERS = {"max_mean": ("max", "mean"), "mean_max": ("mean", "max")}


def check_spatial_options(kernel_size: int, pool_order: str, layer: str) -> None:
    """Raise a ValueError for an unsupported kernel size or pool order."""
    if not is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"{layer}: kernel_size must be an odd positive integer (the paper uses 7, the common "
            f"variant also 3) so that symmetric padding keeps H x W; got {kernel_size!r}."
        )
    if pool_order not in POOL_ORDERS:
        raise ValueError(
            f"{layer}: pool_order must be one of {sorted(POOL_ORDERS)} ('max_mean' = official "
            f"Jongchan/attention-module, 'mean_max' = paper, timm, common variant); got {pool_order!r}."
        )


class SpatialGate(nn.Module):
    """CBAM spatial attention on an NHWC map.

    Input (B, H, W, C) -> output of the same shape, `x * M_s(x)` with M_s of shape (B, H, W, 1).
    Sows `intermediates/spatial_attention` of shape (B, H, W) with values in (0, 1).

    Attributes:
      kernel_size: odd size k of the k x k conv (7 in the paper), stride 1, padding k // 2, no bias.
      pool_order: 'max_mean' (official code) or 'mean_max' (paper, timm, common variant).
      use_bn: a one-channel BatchNorm after the conv (official, timm) or none (common variant).
      bn_momentum: Flax momentum of that BatchNorm (official 0.99 = PyTorch 0.01; timm 0.9).
      bn_epsilon: its epsilon.
      bn_zero_init: initialise its scale to 0 (official), so the gate starts at sigmoid(0) = 0.5.
      bn_axis_name: mapped axis for cross-device batch statistics under pmap/shard_map.
      dtype: computation dtype of the conv; pooling, BatchNorm statistics and sigmoid run in float32.
      param_dtype: parameter dtype.
      implementation: 'auto' (the CPU fast conv, BatchNorm and max gradient of `cpu_ops` on the CPU backend), 'cpu'
        or 'xla' (XLA's own kernels everywhere). Same parameters and results either way.
      kernels: deprecated name of `implementation`.
    """

    kernel_size: int = 7
    pool_order: str = "max_mean"
    use_bn: bool = True
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-5
    bn_zero_init: bool = True
    bn_axis_name: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    implementation: str = "auto"
    kernels: str | None = None  # deprecated: `implementation`

    def __post_init__(self) -> None:
        renamed_option_value(self, "kernels")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Gate `x` (B, H, W, C) position-wise; `train` selects batch statistics for the BatchNorm."""
        layer = type(self).__name__
        check_nhwc(x, layer)
        check_spatial_options(self.kernel_size, self.pool_order, layer)

        pooled = promote_to_float32(x)
        cpu_path = cpu_ops.use_cpu_path(self.implementation)
        pools = {**CHANNEL_POOLS, "max": lambda x: max_over(x, -1, native=cpu_path)}
        compressed = jnp.stack([pools[p](pooled) for p in POOL_ORDERS[self.pool_order]], axis=-1)
        pad = self.kernel_size // 2
        y = nn.Conv(1, (self.kernel_size, self.kernel_size), padding=((pad, pad), (pad, pad)),
                    use_bias=False, kernel_init=conv_kernel_init,
                    conv_general_dilated=cpu_ops.conv_general_dilated if cpu_path else None,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(compressed)
        if self.use_bn:
            norm_cls = cpu_ops.BatchNorm if cpu_path else nn.BatchNorm
            y = norm_cls(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=self.bn_epsilon, use_fast_variance=False,
                         scale_init=nn.initializers.zeros if self.bn_zero_init else nn.initializers.ones,
                         axis_name=self.bn_axis_name, dtype=jnp.float32,
                         param_dtype=self.param_dtype, name="bn")(y)
        scale = jax.nn.sigmoid(promote_to_float32(y))[..., 0]  # (B, H, W)
        self.sow("intermediates", "spatial_attention", scale)
        return x * scale[..., None].astype(x.dtype)
