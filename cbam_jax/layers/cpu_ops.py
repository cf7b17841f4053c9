"""CPU fast paths for training: oneDNN convolutions, a BatchNorm and a max pool with hand-written gradients.

XLA:CPU lowers the kernel gradient of a convolution to another convolution whose "window" is
the whole feature map, which its CPU backend runs at a few GFLOP/s, and differentiates pooling
through unvectorised variadic reductions. These replacements avoid both without changing any
result beyond float rounding:

- `conv_general_dilated`: oneDNN's convolutions (forward, input and kernel gradient; see
  `cbam_jax.layers.native`) where oneDNN is available; otherwise the forward pass and the input
  gradient are XLA's own and the kernel gradient of a 1x1 convolution is one matmul,
  sum_{b,h,w} x_pad[b, s*h, s*w, :]^T g[b, h, w, :].
- `BatchNorm`: training mode with the closed-form BatchNorm gradient, so XLA fuses the backward
  into two reductions and one elementwise pass instead of differentiating the statistics.
- `max_pool`: PyTorch's max pool by a native kernel (forward and gradient), or as a separable
  max over strided slices, whose gradient avoids XLA:CPU's slow variadic window reduction.

They are drop-in replacements for the Linen layers (same parameter and batch-stats tree), chosen
per platform by `use_cpu_path`: GPUs and TPUs keep XLA's own kernels, which are fast there.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from cbam_jax.layers import native
from cbam_jax.layers.common import Dtype, Initializer, max_over

# The `implementation` option of the models: 'auto' = the CPU fast path on the CPU backend only;
# 'cpu' = always; 'xla' = never (XLA's own gradients, the reference path).
IMPLEMENTATIONS = ("auto", "cpu", "xla")

Padding = tuple[tuple[int, int], ...]

# Kernels with at most this many taps (kh * kw) get the matmul kernel gradient. Measured on a
# 2-core AVX2 machine, jax 0.10.2 and 0.12: for 1x1 kernels one matmul is 2-2.5x faster than
# XLA's kernel-gradient convolution (e.g. 14 vs 33 ms, batch 8, 14x14, 1024->256); for 3x3 and
# 7x7 kernels the kh * kw shifted copies of the input cost more than they save (362 vs 162 ms,
# batch 64, 32x32, 64->64), so those keep XLA's own gradient.
MAX_MATMUL_TAPS = 1

# oneDNN convolutions on the CPU backend where `native.enabled()`. Measured on a 2-core Sapphire
# Rapids, jax 0.12, float32, ms XLA -> oneDNN: forward 61 -> 46, input gradient 111 -> 55, kernel
# gradient 292 -> 54 (batch 64, 32x32, 64->64, 3x3); 1x1 256->64 at 56x56 b8 kernel gradient
# 240 -> 9; bfloat16 (AMX) 5-15x faster than XLA's in every pass.
# Convolutions with fewer output channels keep XLA's kernels: the CBAM spatial gate's 7x7 2->1
# conv took 4-8 ms for its kernel gradient in oneDNN against 0.2 ms in XLA.
# Grouped (ResNeXt) and depthwise (MobileNet) convolutions take oneDNN too: XLA:CPU has no grouped
# kernel of its own (it runs a grouped conv as a dense one over a block-diagonal kernel), so
# oneDNN was faster in every pass for every shape of CBAM-ResNeXt-50 (b8) and MobileNet w1 (b32,
# 224px), float32 and bfloat16 (AMD EPYC, AVX-512 bf16, 2 cores, jax 0.10.2, ms XLA -> oneDNN):
# depthwise forward 16-306 -> 0.3-16, input gradient 31-1022 -> 0.3-25, kernel gradient 34-429
# -> 0.3-8; the ResNeXt 32-group 3x3 kernel gradient 604-5322 -> 0.9-6.5 (forward and input
# gradient 4-101 -> 0.5-5). No grouped shape keeps XLA's kernels (the table: docs/performance.md).
ONEDNN_MIN_OUT_CHANNELS = 8


def use_cpu_path(implementation: str) -> bool:
    """Whether a model with `implementation` ('auto', 'cpu' or 'xla') takes the CPU fast path now."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} ('auto' = the CPU fast path on the CPU "
                         f"backend only, 'xla' = XLA's own kernels everywhere); got {implementation!r}.")
    return implementation == "cpu" or (implementation == "auto" and jax.default_backend() == "cpu")


# ----------------------------------------------------------------------------- convolution


def _nhwc_numbers(lhs: jax.Array, rhs: jax.Array) -> lax.ConvDimensionNumbers:
    return lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1, precision=None,
                         preferred_element_type=None) -> jax.Array:
    """`lax.conv_general_dilated` by oneDNN or with the matmul kernel gradient (pass as `nn.Conv(conv_general_dilated=...)`).

    The fast paths cover 2-D NHWC/HWIO convolutions with any stride, kernel dilation and
    non-negative padding and no input dilation: oneDNN's (float32, or bfloat16 where the CPU has
    oneDNN's bfloat16 kernels, at least `ONEDNN_MIN_OUT_CHANNELS` outputs, on the CPU backend,
    where `native.enabled()`; also grouped and depthwise, `feature_group_count` > 1), else, without
    feature groups, the matmul kernel gradient for at most `MAX_MATMUL_TAPS` taps; anything else is
    handed to `lax.conv_general_dilated` unchanged. lhs (B, H, W, Cin), rhs (kh, kw, Cin / G, Cout)
    -> (B, Ho, Wo, Cout) with G = `feature_group_count`.
    """
    plain = functools.partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding,
                              lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
                              batch_group_count=batch_group_count, precision=precision,
                              preferred_element_type=preferred_element_type)
    if lhs.ndim != 4 or rhs.ndim != 4:
        return plain()
    nhwc = _nhwc_numbers(lhs, rhs)
    dilation = tuple(rhs_dilation or (1, 1))
    if isinstance(padding, str):
        dilated_window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation)]
        padding = lax.padtype_to_pads(lhs.shape[1:3], dilated_window, window_strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    supported = (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
                 and all(d == 1 for d in (lhs_dilation or (1, 1))) and batch_group_count == 1
                 and preferred_element_type is None and min(min(p) for p in padding) >= 0)
    if supported and _use_onednn(lhs, rhs, feature_group_count):
        return native.conv(lhs, rhs, tuple(window_strides), padding, dilation)
    if not supported or feature_group_count != 1 or rhs.shape[0] * rhs.shape[1] > MAX_MATMUL_TAPS:
        return plain()
    return _conv(lhs, rhs, tuple(window_strides), padding, dilation, precision)


def _use_onednn(lhs: jax.Array, rhs: jax.Array, feature_group_count: int) -> bool:
    return (lhs.dtype == rhs.dtype and lhs.dtype in (jnp.float32, jnp.bfloat16)
            # shapes lax would reject go to lax, for its error message
            and lhs.shape[3] == feature_group_count * rhs.shape[2] and rhs.shape[3] % feature_group_count == 0
            and rhs.shape[3] >= ONEDNN_MIN_OUT_CHANNELS and jax.default_backend() == "cpu" and native.enabled()
            and (lhs.dtype == jnp.float32 or native.bfloat16_convolutions()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: Padding,
          dilation: tuple[int, int], precision) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
                                    dimension_numbers=_nhwc_numbers(x, kernel), precision=precision)


def _conv_fwd(x, kernel, strides, padding, dilation, precision):
    return _conv(x, kernel, strides, padding, dilation, precision), (x, kernel)


def _conv_bwd(strides, padding, dilation, precision, residuals, grad):
    x, kernel = residuals
    # The input gradient is a transposed convolution that XLA:CPU runs well: keep XLA's own.
    input_grad = jax.linear_transpose(
        lambda x_: lax.conv_general_dilated(x_, kernel, strides, padding, rhs_dilation=dilation,
                                            dimension_numbers=_nhwc_numbers(x, kernel), precision=precision),
        x)(grad)[0]
    return input_grad, _kernel_grad(x, grad, kernel.shape, strides, padding, dilation, precision).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _kernel_grad(x: jax.Array, grad: jax.Array, kernel_shape: Sequence[int], strides: tuple[int, int],
                 padding: Padding, dilation: tuple[int, int], precision) -> jax.Array:
    """dL/dkernel (kh, kw, Cin, Cout) as kh * kw matmuls (B*Ho*Wo, Cin)^T @ (B*Ho*Wo, Cout), float32 accumulation."""
    kh, kw, cin, _ = kernel_shape
    batch, out_h, out_w, _ = grad.shape
    if any(lo or hi for lo, hi in padding):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    taps = []
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilation[0], j * dilation[1]
            shifted = lax.slice(x, (0, top, left, 0),
                                (batch, top + strides[0] * (out_h - 1) + 1, left + strides[1] * (out_w - 1) + 1, cin),
                                (1, strides[0], strides[1], 1))  # (B, Ho, Wo, Cin): the inputs tap (i, j) sees
            taps.append(lax.dot_general(shifted, grad, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision,
                                        preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, cin, -1)


# ----------------------------------------------------------------------------- max pool


def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
    """PyTorch's `max_pool2d` (square window, -inf padding): (B, H, W, C) -> (B, Ho, Wo, C).

    Separable: the max over the window's columns, then over its rows, each over strided slices
    through `max_over`. Taking the first maximum along W, then the first row holding the maximum,
    selects the first maximum in row-major scanning order, the element PyTorch's gradient goes
    to. XLA:CPU differentiates `reduce_window` through a variadic window reduction with index
    arrays: 115 ms for the ResNet-50 stem's 3x3/2 pool (batch 8, 224px, forward + backward)
    against 32 ms this way (jax 0.12, 2 cores). Where the native kernels take x
    (`native.usable_for`) both passes are one native kernel each, `native.max_pool`, with the same
    results: forward + backward of that pool in bfloat16 160 -> 10 ms (2-core AVX-512 EPYC, jax 0.10.2;
    XLA:CPU ran the separable pool's bfloat16 maxima and their gradient as float32 loop fusions).
    """
    if native.usable_for(x, positions=x.shape[1] * x.shape[2]) and padding < window:
        return native.max_pool(x, window, stride, padding)
    x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    for axis in (2, 1):
        size = (x.shape[axis] - window) // stride + 1
        taps = [lax.slice_in_dim(x, i, i + stride * (size - 1) + 1, stride, axis) for i in range(window)]
        x = max_over(jnp.stack(taps), 0, native=True)
    return x


# ----------------------------------------------------------------------------- BatchNorm


def _pmean(value: jax.Array, axis_name: str | None) -> jax.Array:
    return value if axis_name is None else lax.pmean(value, axis_name)


# BatchNorm's reductions run natively (`native.batch_stats`, `native.batch_norm_grad_sums`) from
# this many channels up, where the native kernels take the data: XLA:CPU converted bfloat16 activations
# into float32 copies before reducing them. Measured on a 2-core AVX-512 EPYC, jax 0.10.2, 25088 x 256:
# statistics 3.9 -> 0.9 ms (bfloat16), 2.7 -> 1.5 ms (float32), at least as accurate as XLA's (plain
# float32 sums of 16+ rows were 2x less accurate, enough to fail the plain MobileNet's train-mode
# parity with PyTorch over 16 values per channel). One-channel norms (the spatial gate's) keep
# XLA's reductions.
NATIVE_NORM_MIN_CHANNELS = 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None = None, dtype: Dtype | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode BatchNorm over all but the last axis: (y, batch mean, biased batch variance).

    x (..., C), scale and bias (C,). The statistics are float32, y is `dtype` (default float32),
    computed in float32; with `axis_name` the statistics are averaged over that mapped axis (pmap,
    shard_map, vmap), as Linen's BatchNorm does.
    """
    return _batch_norm_fwd(x, scale, bias, epsilon, axis_name, dtype)[0]


def _native_norm(x: jax.Array) -> bool:
    return x.shape[-1] >= NATIVE_NORM_MIN_CHANNELS and native.usable_for(x)


def _batch_norm_fwd(x, scale, bias, epsilon, axis_name, dtype):
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(jnp.float32)
    if _native_norm(x):
        mean, var = native.batch_stats(x.reshape(-1, x.shape[-1]))
        if axis_name is not None:  # equal counts on every member: the pooled variance
            local_mean, mean = mean, _pmean(mean, axis_name)
            var = _pmean(var + jnp.square(local_mean - mean), axis_name)
    else:
        mean = _pmean(jnp.mean(x32, axes), axis_name)
        var = _pmean(jnp.mean(jnp.square(x32 - mean), axes), axis_name)  # two-pass, like use_fast_variance=False
    inv_std = lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return (y.astype(dtype or jnp.float32), mean, var), (x, scale, bias, mean, inv_std)


def _batch_norm_bwd(epsilon, axis_name, dtype, residuals, cotangents):
    del epsilon, dtype
    x, scale, bias, mean, inv_std = residuals
    axes = tuple(range(x.ndim - 1))
    local_count = x.size // x.shape[-1]
    centred = x.astype(jnp.float32) - mean
    normalised = centred * inv_std
    output_grad = cotangents[0]  # in y's dtype: the native sums read it so (bfloat16 in a bfloat16 model), once
    grad_y, grad_mean, grad_var = (c.astype(jnp.float32) for c in cotangents)
    if _native_norm(x) and output_grad.dtype == x.dtype:
        sum_grad_y, sum_grad_y_centred = native.batch_norm_grad_sums(
            x.reshape(local_count, -1), output_grad.reshape(local_count, -1), mean)
        grad_bias, grad_scale = sum_grad_y, sum_grad_y_centred * inv_std
    else:
        grad_bias = jnp.sum(grad_y, axes)
        grad_scale = jnp.sum(grad_y * normalised, axes)
    # d/dx of y = scale * (x - mean) * inv_std with mean and inv_std functions of the whole batch;
    # the cotangents of the returned statistics (zero when they only feed the running averages) add
    # d mean / dx = 1/N and d var / dx = 2 (x - mean) / N.
    mean_grad_y = _pmean(grad_bias / local_count, axis_name)
    mean_grad_y_norm = _pmean(grad_scale / local_count, axis_name)
    scaled = scale.astype(jnp.float32) * inv_std
    count = local_count * (1 if axis_name is None else lax.psum(1, axis_name))
    grad_x = (scaled * (grad_y - mean_grad_y - normalised * mean_grad_y_norm)
              + grad_mean / count + grad_var * (2.0 / count) * centred)
    return grad_x.astype(x.dtype), grad_scale.astype(scale.dtype), grad_bias.astype(bias.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


class BatchNorm(nn.Module):
    """`nn.BatchNorm` over the last axis with the closed-form training gradient: (..., C) -> (..., C).

    Same variables as `nn.BatchNorm` (params scale, bias; batch_stats mean, var, float32) and the
    same options as the ResNets pass them; the variance is always the two-pass one
    (`use_fast_variance=False`), the only setting accepted.
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    use_fast_variance: bool = False
    axis_name: str | None = None
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Normalise `x` (..., C) with batch statistics (training) or the running averages."""
        if self.use_fast_variance:
            raise ValueError("cpu_ops.BatchNorm computes the two-pass variance only; use_fast_variance must be False.")
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", self.scale_init, features, self.param_dtype)
        bias = self.param("bias", self.bias_init, features, self.param_dtype)
        out_dtype = self.dtype or jnp.result_type(x, scale, bias)
        if use_running_average:
            factor = lax.rsqrt(ra_var.value + self.epsilon) * scale.astype(jnp.float32)
            y = (x.astype(jnp.float32) - ra_mean.value) * factor + bias.astype(jnp.float32)
            return y.astype(out_dtype)
        # Linen averages over the mapped axis only outside of init; so do we.
        axis_name = None if self.is_initializing() else self.axis_name
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, axis_name, jnp.dtype(out_dtype))
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y
