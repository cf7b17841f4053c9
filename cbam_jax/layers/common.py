"""Shared pieces of the attention layers: input checks and PyTorch-matching initialisers."""

import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Mapping
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


def check_nhwc(x: jax.Array, layer: str, train: bool = False) -> None:
    """Raise a ValueError unless `x` is a rank-4 (batch, height, width, channels) array, with at least
    one image when `train` (BatchNorm statistics of an empty batch are NaN and would be kept)."""
    if x.ndim != 4:
        raise ValueError(
            f"{layer} expects an NHWC input of rank 4 (batch, height, width, channels); "
            f"got shape {tuple(x.shape)}. Add a batch axis or transpose NCHW with x.transpose(0, 2, 3, 1)."
        )
    if train and x.shape[0] == 0:
        raise ValueError(f"{layer}: train=True needs at least one image for the BatchNorm statistics; got an empty "
                         f"batch of shape {tuple(x.shape)}. Skip empty batches, or apply with train=False.")


def hidden_width(channels: int, reduction: int, layer: str) -> int:
    """The bottleneck width of a gate MLP: `channels // reduction`, but at least 1.

    The floor is the official CBAM/BAM code's (and Hu et al.'s) `channels // reduction`, so every
    parameter count of the papers stays as it is; the lower bound of 1 is timm's for its attention
    layers (`make_divisible`'s result never falls below its divisor, 1 for CBAM), so that a gate on
    fewer channels than the reduction (the 8-channel first layers of MobileNet-0.25, a width-8 test
    ResNet) has one hidden unit instead of none. timm rounds C / reduction to the nearest integer
    instead of down: the same width whenever the reduction divides the channels.
    """
    if not is_int(reduction) or reduction < 1:
        raise ValueError(f"{layer}: reduction must be a positive integer, got {reduction!r}.")
    return max(1, channels // reduction)


def is_int(value: Any) -> bool:
    """True for Python and NumPy integers (not bools): what a size or count option must be."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def promote_to_float32(x: jax.Array) -> jax.Array:
    """Cast low-precision activations to float32 for reductions (no-op for float32)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def max_over(x: jax.Array, axis: int | tuple[int, ...], native: bool = False) -> jax.Array:
    """`jnp.max(x, axis)` over adjacent axes whose gradient goes to the first maximum only, as PyTorch's max pools.

    The forward pass is XLA's plain max reduction, so inference pays nothing extra. The gradient
    is written by hand: jnp.max's own finds the maxima by comparing the input with the result, and
    under jit XLA:CPU may recompute a fused input in a second fusion with slightly different
    rounding, so the comparison missed and the gradient was lost (seen in CBAM-ResNets on jax
    0.10.2 and 0.12: up to 60% off, training only; an optimisation barrier before the max did not
    prevent it on jax 0.10.2). Here the backward pass takes the argmax of the input (the first
    maximum in row-major order over the reduced axes) in one reduction and needs no equality test.
    With `native` (the CPU path) that backward pass is one vectorised native kernel
    (`cbam_jax.layers.native.max_grad`) where it is available: XLA:CPU does not vectorise the
    argmax reduction.
    """
    axes = tuple(sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)))
    if axes != tuple(range(axes[0], axes[0] + len(axes))):
        raise ValueError(f"max_over reduces adjacent axes only (merged by a free reshape); got {axis!r} for rank {x.ndim}.")
    return _max_first(x, axes, native)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_first(x: jax.Array, axes: tuple[int, ...], native: bool) -> jax.Array:
    return jnp.max(x, axes)


def _max_first_fwd(x, axes, native):
    return jnp.max(x, axes), x


def _max_first_bwd(axes, native, x, grad):
    # The reduced axes merged into one, the argmax along it, the gradient sent there.
    merged = axes[0]
    if native:
        from cbam_jax.layers import native as native_kernels  # the layers package imports this module

        if native_kernels.usable_for(x):
            prefix = int(np.prod(x.shape[:merged]))
            flat = x.reshape(prefix, -1, int(np.prod(x.shape[axes[-1] + 1:])))
            return (native_kernels.max_grad(flat, grad.reshape(flat.shape[0], flat.shape[2])).reshape(x.shape),)
    flat = x.reshape(x.shape[:merged] + (-1,) + x.shape[axes[-1] + 1:])
    first = jnp.argmax(flat, axis=merged, keepdims=True)
    position = jax.lax.broadcasted_iota(first.dtype, flat.shape, merged)
    flat_grad = jnp.where(position == first, jnp.expand_dims(grad, merged), 0).astype(x.dtype)
    return (flat_grad.reshape(x.shape),)


_max_first.defvjp(_max_first_fwd, _max_first_bwd)
