"""Shared pieces of the attention layers: input checks and PyTorch-matching initialisers."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any
Initializer = jax.nn.initializers.Initializer

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): what the official code, timm and the
# common variant use for convolutions.
conv_kernel_init: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default for nn.Linear / nn.Conv2d weights: kaiming_uniform_(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The official code leaves the CBAM MLP and the
# downsample convolutions at this default.
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def check_nhwc(x: jax.Array, layer: str) -> None:
    """Raise a ValueError unless `x` is a rank-4 (batch, height, width, channels) array."""
    if x.ndim != 4:
        raise ValueError(
            f"{layer} expects an NHWC input of rank 4 (batch, height, width, channels); "
            f"got shape {tuple(x.shape)}. Add a batch axis or transpose NCHW with x.transpose(0, 2, 3, 1)."
        )


def hidden_width(channels: int, reduction: int, layer: str) -> int:
    """The bottleneck width `channels // reduction` of a gate MLP, checked to be at least 1."""
    if not is_int(reduction) or reduction < 1:
        raise ValueError(f"{layer}: reduction must be a positive integer, got {reduction!r}.")
    if reduction > channels:
        raise ValueError(
            f"{layer}: reduction {reduction} is larger than the number of channels {channels}; "
            f"the hidden width channels // reduction would be 0. Use a reduction <= {channels}."
        )
    return channels // reduction


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers (not bools): what a size or count option must be."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def promote_to_float32(x: jax.Array) -> jax.Array:
    """Cast low-precision activations to float32 for reductions (no-op for float32)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def max_over(x: jax.Array, axis: int | tuple[int, ...]) -> jax.Array:
    """`jnp.max(x, axis)` whose gradient flows to the (first) argmax, as PyTorch's max pools.

    jnp.max's own gradient finds the maxima by comparing the input with the result for equality.
    Under jit, XLA:CPU may recompute the input of a fused max in a second fusion with slightly
    different rounding, so the comparison can miss and the gradient goes wrong (seen in
    CBAM-ResNets on jax 0.10.2 and 0.12: up to 60% off, training only). Gathering at argmax
    indices needs no equality test.
    """
    axes = tuple(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
    kept = [a for a in range(x.ndim) if a not in axes]
    moved = jnp.transpose(x, kept + list(axes))
    flat = moved.reshape(moved.shape[:len(kept)] + (-1,))
    index = jnp.argmax(flat, axis=-1)
    return jnp.take_along_axis(flat, index[..., None], axis=-1)[..., 0]
