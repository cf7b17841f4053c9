"""BAM, the Bottleneck Attention Module (Park, Woo et al., BMVC 2018), as the official code has it.

    F' = F * (1 + sigmoid(M_c(F) (x) M_s(F)))

M_c: global average pool -> Linear(C, C/r) -> BN -> ReLU -> Linear(C/r, C), shape (B, 1, 1, C).
M_s: 1x1 conv C -> C/r -> BN -> ReLU -> 2 x [3x3 conv, dilation d -> BN -> ReLU] -> 1x1 conv -> 1,
     shape (B, H, W, 1).
The BAM paper combines the two maps with a sum; the official code (Jongchan/attention-module,
MODELS/bam.py) multiplies them. `combine='product'` (default) reproduces the released code and
its checkpoints; `combine='sum'` gives the paper's formula.
"""

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.layers.common import (
    Dtype,
    check_nhwc,
    conv_kernel_init,
    hidden_width,
    promote_to_float32,
    torch_default_kernel_init,
)

COMBINE_MODES = ("product", "sum")


class BAM(nn.Module):
    """Bottleneck Attention Module on an NHWC map: (B, H, W, C) -> (B, H, W, C).

    Sows `intermediates/channel_attention` = sigmoid(M_c) of shape (B, C) and
    `intermediates/spatial_attention` = sigmoid(M_s) of shape (B, H, W): each branch's own map,
    for inspection; the applied gate is sigmoid of their `combine`.

    Attributes:
      reduction: hidden width max(1, C // reduction) of both branches (16).
      dilation: dilation (and padding) of the two 3x3 convs of the spatial branch (4).
      combine: 'product' (official code) or 'sum' (BAM paper).
      bn_momentum, bn_epsilon: BatchNorm settings (Flax momentum 0.9 = PyTorch 0.1).
      bn_axis_name: mapped axis for cross-device batch statistics under pmap/shard_map.
      dtype, param_dtype: computation and parameter dtypes.
    """

    reduction: int = 16
    dilation: int = 4
    combine: str = "product"
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_axis_name: str | None = None
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Gate `x` (B, H, W, C); `train` selects batch statistics for the BatchNorms."""
        layer = type(self).__name__
        check_nhwc(x, layer, train)
        if self.combine not in COMBINE_MODES:
            raise ValueError(f"{layer}: combine must be one of {COMBINE_MODES}; got {self.combine!r}.")
        channels = x.shape[-1]
        hidden = hidden_width(channels, self.reduction, layer)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, use_fast_variance=False, axis_name=self.bn_axis_name,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        dense = functools.partial(nn.Dense, kernel_init=torch_default_kernel_init,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        conv = functools.partial(nn.Conv, kernel_init=conv_kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)

        c = jnp.mean(promote_to_float32(x), axis=(1, 2))
        c = nn.relu(norm(name="channel_bn")(dense(hidden, name="channel_fc1")(c)))
        c = dense(channels, name="channel_fc2")(c)  # (B, C)

        d = self.dilation
        s = nn.relu(norm(name="spatial_reduce_bn")(conv(hidden, (1, 1), name="spatial_reduce")(x)))
        for i in range(2):
            s = conv(hidden, (3, 3), kernel_dilation=(d, d), padding=((d, d), (d, d)), name=f"spatial_dilated{i}")(s)
            s = nn.relu(norm(name=f"spatial_dilated{i}_bn")(s))
        s = conv(1, (1, 1), name="spatial_final")(s)  # (B, H, W, 1)

        c = promote_to_float32(c)[:, None, None, :]
        s = promote_to_float32(s)
        logits = c * s if self.combine == "product" else c + s
        self.sow("intermediates", "channel_attention", jax.nn.sigmoid(c[:, 0, 0, :]))
        self.sow("intermediates", "spatial_attention", jax.nn.sigmoid(s[..., 0]))
        return x * (1 + jax.nn.sigmoid(logits)).astype(x.dtype)
