"""Channel attention (CBAM paper, section 3, Eq. 2): which channels matter.

    M_c(F) = sigmoid( sum_{p in pool_types} MLP(pool_p(F)) )

Every pooled descriptor goes through ONE shared two-layer MLP and the raw outputs are summed
before the sigmoid, so the second layer's bias is counted once per pool type, as in the official
code.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.layers import cpu_ops, native
from cbam_jax.layers.common import (
    Dtype,
    Initializer,
    check_nhwc,
    hidden_width,
    max_over,
    promote_to_float32,
    torch_default_kernel_init,
)

# Global pools over the spatial axes of an NHWC map: (B, H, W, C) -> (B, C).
SPATIAL_POOLS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "avg": lambda x: jnp.mean(x, axis=(1, 2)),
    "max": lambda x: max_over(x, (1, 2)),
    # F.lp_pool2d(x, 2, (H, W)) in the official code: the L2 norm over positions (a sum, not a mean).
    "lp": lambda x: jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2))),
    # Log-sum-exp over all H*W positions, stabilised by the max, not normalised by the count.
    "lse": lambda x: jax.nn.logsumexp(x, axis=(1, 2)),
}


def check_pool_types(pool_types: Sequence[str], layer: str) -> None:
    """Raise a ValueError unless `pool_types` is a non-empty sequence of known pool names."""
    if isinstance(pool_types, str) or not pool_types:
        raise ValueError(f"{layer}: pool_types must be a non-empty sequence such as ('avg', 'max'); got {pool_types!r}.")
    unknown = [p for p in pool_types if p not in SPATIAL_POOLS]
    if unknown:
        raise ValueError(f"{layer}: unknown pool type(s) {unknown}; allowed: {sorted(SPATIAL_POOLS)}.")


class ChannelGate(nn.Module):
    """CBAM channel attention on an NHWC map.

    Input (B, H, W, C) -> output of the same shape, `x * M_c(x)` with M_c of shape (B, 1, 1, C).
    Sows `intermediates/channel_attention` of shape (B, C) with values in (0, 1).

    Attributes:
      reduction: hidden width of the shared MLP is `max(1, C // reduction)` (16 in the paper; at least one unit, as timm).
      pool_types: global pools whose MLP outputs are summed: any of 'avg', 'max', 'lp', 'lse'.
      mlp_bias: whether the MLP layers have biases (official: yes; timm and the common variant: no).
      kernel_init: MLP weight initialiser (default: PyTorch's nn.Linear default, as the official code).
      dtype: computation dtype of the MLP; the pools and the sigmoid run in at least float32.
      param_dtype: parameter dtype.
      implementation: 'auto' (on the CPU backend the avg and max pools and the gate's product run
        native kernels, `cbam_jax.layers.native`, one pass over x each), 'cpu' or 'xla'. Same results
        within float rounding.
    """

    reduction: int = 16
    pool_types: Sequence[str] = ("avg", "max")
    mlp_bias: bool = True
    kernel_init: Initializer = torch_default_kernel_init
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, *, return_logits: bool = False) -> jax.Array:
        """Gate `x` (B, H, W, C) channel-wise; `train` is accepted for a uniform layer signature.

        With `return_logits=True` the result is the attention logits (B, 1, 1, C) in float32 (the
        map before its sigmoid) instead of the gated input (CBAM's parallel arrangement adds them
        to the spatial gate's).
        """
        del train  # no batch-dependent state
        layer = type(self).__name__
        check_nhwc(x, layer)
        check_pool_types(self.pool_types, layer)
        channels = x.shape[-1]
        hidden = hidden_width(channels, self.reduction, layer)

        pooled = promote_to_float32(x)
        native_path = cpu_ops.use_cpu_path(self.implementation)
        pools = {**SPATIAL_POOLS, "max": lambda x: max_over(x, (1, 2), native=native_path)}
        batch, height, width = x.shape[:3]
        # The CPU path's native kernels read x once for both pools and once for the product's gradient.
        fused = native_path and native.usable_for(x, positions=height * width)
        if fused and {"avg", "max"} & set(self.pool_types):
            mean, peak = native.avg_max(x.reshape(batch, height * width, channels))
            pools.update(avg=lambda _: mean, max=lambda _: peak)
        descriptors = jnp.stack([pools[p](pooled) for p in self.pool_types])  # (P, B, C)
        dense = functools.partial(nn.Dense, use_bias=self.mlp_bias, kernel_init=self.kernel_init,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        hidden_act = nn.relu(dense(hidden, name="fc1")(descriptors))
        logits = promote_to_float32(dense(channels, name="fc2")(hidden_act).sum(axis=0))  # shared MLP, outputs summed
        scale = jax.nn.sigmoid(logits)  # (B, C)
        self.sow("intermediates", "channel_attention", scale)
        if return_logits:
            return logits[:, None, None, :]
        if fused:
            return native.gate(x.reshape(batch, height * width, channels), scale).reshape(x.shape)
        return x * scale[:, None, None, :].astype(x.dtype)
