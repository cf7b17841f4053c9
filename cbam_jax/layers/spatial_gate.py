"""Spatial attention (CBAM paper, section 3, Eq. 3): where to look.

    M_s(F) = sigmoid( BN( conv_kxk( D(F) ) ) )

    D(F) = [pool_a(F); pool_b(F)]   descriptor='pool' (the paper's CBAM): (B, H, W, 2)
    D(F) = conv_1x1(F)              descriptor='conv1x1' (Sec. 4.1 ablation): (B, H, W, 1)

The two maps pooled over channels are stacked in a source-dependent order: the official code
puts MAX first, timm and the paper MEAN first. The official code and timm normalise the conv
output with a one-channel BatchNorm (not in the paper's equation); the common variant does not.

The paper's ablation (Sec. 4.1, Table 2) compares this channel pooling with "standard 1x1
convolution reducing the channel dimension into 1", each followed by the k x k conv (k = 3 or 7);
pooling won (22.66% vs 22.90% top-1 error at k = 7, ImageNet ResNet-50). The paper does not say
whether that 1x1 conv has a bias or how it is initialised: here it has no bias (like every conv
of the gate; a constant before the k x k conv and the BatchNorm adds nothing but a border effect
of the zero padding) and PyTorch's default initialisation U(+-1/sqrt(C)), which keeps the
descriptor on the scale of the input (standard deviation ~0.6x its); the kaiming fan-out rule of
the gate's k x k conv would give each weight a standard deviation of sqrt(2) (fan-out 1), a
descriptor ~sqrt(2C) times the input's scale.
"""

import functools

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
    torch_default_kernel_init,
)

# Pools over the channel axis of an NHWC map: (B, H, W, C) -> (B, H, W).
CHANNEL_POOLS = {"max": lambda x: max_over(x, -1), "mean": lambda x: jnp.mean(x, axis=-1)}
# pool_order -> the pools in the order of the conv's input channels.
POOL_ORDERS = {"max_mean": ("max", "mean"), "mean_max": ("mean", "max")}
# How the (B, H, W, C) input is compressed to the conv's input: channel pooling or a learned 1x1 conv.
DESCRIPTORS = ("pool", "conv1x1")


def check_spatial_options(kernel_size: int, pool_order: str, layer: str, descriptor: str = "pool",
                          prefix: str = "") -> None:
    """Raise a ValueError for an unsupported kernel size, pool order or descriptor (`prefix`: how
    the caller spells the descriptor option, 'spatial_' in CBAM)."""
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
    if descriptor not in DESCRIPTORS:
        raise ValueError(
            f"{layer}: {prefix}descriptor must be one of {DESCRIPTORS} ('pool' = max and mean over channels, "
            f"the paper's CBAM; 'conv1x1' = a learned 1x1 conv to one channel, its Sec. 4.1 ablation); "
            f"got {descriptor!r}."
        )


class SpatialGate(nn.Module):
    """CBAM spatial attention on an NHWC map.

    Input (B, H, W, C) -> output of the same shape, `x * M_s(x)` with M_s of shape (B, H, W, 1).
    Sows `intermediates/spatial_attention` of shape (B, H, W) with values in (0, 1).

    Attributes:
      kernel_size: odd size k of the k x k conv (7 in the paper), stride 1, padding k // 2, no bias.
      pool_order: 'max_mean' (official code) or 'mean_max' (paper, timm, common variant); the
        order of the conv's two input channels (unused with descriptor='conv1x1').
      use_bn: a one-channel BatchNorm after the conv (official, timm) or none (common variant).
      bn_momentum: Flax momentum of that BatchNorm (official 0.99 = PyTorch 0.01; timm 0.9).
      bn_epsilon: its epsilon.
      bn_zero_init: initialise its scale to 0 (official), so the gate starts at sigmoid(0) = 0.5.
      bn_axis_name: mapped axis for cross-device batch statistics under pmap/shard_map.
      dtype: computation dtype of the conv; pooling, BatchNorm statistics and sigmoid run in float32.
      param_dtype: parameter dtype.
      implementation: 'auto' (the CPU fast conv, BatchNorm and max gradient of `cpu_ops` on the CPU backend), 'cpu'
        or 'xla' (XLA's own kernels everywhere). Same parameters and results either way.
      descriptor: 'pool' (max and mean over channels, the paper's CBAM) or 'conv1x1' (a learned
        1x1 conv C -> 1, no bias, params `compress/kernel` (1, 1, C, 1); the paper's Sec. 4.1
        alternative); the k x k conv then has 2 or 1 input channel(s).
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
    descriptor: str = "pool"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, return_logits: bool = False) -> jax.Array:
        """Gate `x` (B, H, W, C) position-wise; `train` selects batch statistics for the BatchNorm.

        With `return_logits=True` the result is the attention logits (B, H, W, 1) in float32 (the
        map before its sigmoid) instead of the gated input (CBAM's parallel arrangement adds them
        to the channel gate's).
        """
        layer = type(self).__name__
        check_nhwc(x, layer, train and self.use_bn)
        check_spatial_options(self.kernel_size, self.pool_order, layer, self.descriptor)

        cpu_path = cpu_ops.use_cpu_path(self.implementation)
        conv = functools.partial(nn.Conv, features=1, use_bias=False,
                                 conv_general_dilated=cpu_ops.conv_general_dilated if cpu_path else None,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        if self.descriptor == "pool":
            pooled = promote_to_float32(x)
            pools = {**CHANNEL_POOLS, "max": lambda x: max_over(x, -1, native=cpu_path)}
            compressed = jnp.stack([pools[p](pooled) for p in POOL_ORDERS[self.pool_order]], axis=-1)
        else:
            compressed = conv(kernel_size=(1, 1), kernel_init=torch_default_kernel_init, name="compress")(x)
        pad = self.kernel_size // 2
        y = conv(kernel_size=(self.kernel_size, self.kernel_size), padding=((pad, pad), (pad, pad)),
                 kernel_init=conv_kernel_init, name="conv")(compressed)
        if self.use_bn:
            norm_cls = cpu_ops.BatchNorm if cpu_path else nn.BatchNorm
            y = norm_cls(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=self.bn_epsilon, use_fast_variance=False,
                         scale_init=nn.initializers.zeros if self.bn_zero_init else nn.initializers.ones,
                         axis_name=self.bn_axis_name, dtype=jnp.promote_types(y.dtype, jnp.float32),
                         param_dtype=self.param_dtype, name="bn")(y)
        logits = promote_to_float32(y)  # (B, H, W, 1)
        scale = jax.nn.sigmoid(logits)[..., 0]  # (B, H, W)
        self.sow("intermediates", "spatial_attention", scale)
        if return_logits:
            return logits
        return x * scale[..., None].astype(x.dtype)
