"""The CPU fast path (cbam_jax.layers.cpu_ops) gives the plain path's values and gradients."""

import functools
import platform
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax

from cbam_jax.layers import cpu_ops, native
from cbam_jax.layers.common import max_over
from cbam_jax.mobilenet import MobileNet
from cbam_jax.registry import create_model, model_config, model_from_config
from cbam_jax.resnet import ResNet

NHWC = ("NHWC", "HWIO", "NHWC")


def _random(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _assert_trees_close(actual, expected, rtol, atol):
    """Leaf-wise allclose; `atol` is relative to the leaf's largest magnitude (float sums of many terms)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, jax.tree_util.keystr(path)
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol * max(1.0, float(np.abs(e).max(initial=0))),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kernel_shape, strides, padding, dilation", [
    ((3, 3, 5, 6), (1, 1), ((1, 1), (1, 1)), (1, 1)),   # BasicBlock conv
    ((3, 3, 5, 6), (2, 2), ((1, 1), (1, 1)), (1, 1)),   # strided 3x3
    ((1, 1, 5, 6), (2, 2), "VALID", (1, 1)),            # downsample 1x1/2
    ((7, 7, 3, 4), (2, 2), ((3, 3), (3, 3)), (1, 1)),   # ImageNet stem
    ((7, 7, 2, 1), (1, 1), ((3, 3), (3, 3)), (1, 1)),   # CBAM spatial gate
    ((3, 3, 5, 6), (1, 1), "SAME", (2, 2)),             # dilated, string padding (BAM)
    ((2, 3, 5, 6), (1, 2), ((0, 1), (2, 0)), (1, 1)),   # uneven kernel, stride and padding
])
def test_conv_matches_lax_conv_and_its_gradients(kernel_shape, strides, padding, dilation, monkeypatch):
    monkeypatch.setattr(cpu_ops, "MAX_MATMUL_TAPS", 49)  # the matmul kernel gradient for every kernel size
    monkeypatch.setattr(native, "ENABLED", False)
    x, kernel = _random((3, 11, 10, kernel_shape[2]), 0), _random(kernel_shape, 1)

    def loss(conv, x, kernel):
        y = conv(x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC)
        return jnp.sum(y * jnp.cos(y)), y  # a non-linear loss: the cotangent varies per element

    (_, y_fast), grads_fast = jax.jit(jax.value_and_grad(lambda *a: loss(cpu_ops.conv_general_dilated, *a),
                                                         argnums=(0, 1), has_aux=True))(x, kernel)
    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(lambda *a: loss(lax.conv_general_dilated, *a),
                                                       argnums=(0, 1), has_aux=True))(x, kernel)
    np.testing.assert_allclose(y_fast, y_ref, rtol=1e-6, atol=1e-6)
    _assert_trees_close(grads_fast, grads_ref, rtol=1e-5, atol=1e-5)


ONEDNN_CASES = [
    ((3, 3, 5, 8), (1, 1), ((1, 1), (1, 1)), (1, 1)),    # BasicBlock conv
    ((3, 3, 6, 8), (2, 2), ((1, 1), (1, 1)), (1, 1)),    # strided 3x3
    ((1, 1, 5, 16), (2, 2), ((0, 0), (0, 0)), (1, 1)),   # downsample 1x1/2
    ((1, 1, 16, 8), (1, 1), ((0, 0), (0, 0)), (1, 1)),   # bottleneck 1x1
    ((7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1)),    # ImageNet stem
    ((3, 3, 5, 8), (1, 1), ((2, 2), (2, 2)), (2, 2)),    # dilated (BAM)
    ((2, 3, 5, 9), (1, 2), ((0, 1), (2, 0)), (1, 1)),    # uneven kernel, stride and padding
]


def _conv_loss_and_grads(conv, x, kernel, strides, padding, dilation, groups=1):
    def loss(x, kernel):
        y = conv(x, kernel, strides, padding, rhs_dilation=dilation, dimension_numbers=NHWC,
                 feature_group_count=groups)
        y32 = y.astype(jnp.float32)
        return jnp.sum(y32 * jnp.cos(y32)), y  # a non-linear loss: the cotangent varies per element

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)


def test_onednn_is_available_on_linux_x86_64():
    """cbam-jax depends on the oneDNN pip package there and builds the shim on first use: a silent
    fallback to XLA's convolutions would only show as a slow benchmark."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("oneDNN convolutions are built on Linux x86-64 only")
    assert native.available(), native._state.get("error")
    with open("/proc/cpuinfo") as f:
        if "avx512_bf16" in f.read():  # oneDNN's bfloat16 convolutions need AVX-512 at least
            assert native.bfloat16_convolutions()


@pytest.mark.parametrize("kernel_shape, strides, padding, dilation", ONEDNN_CASES)
def test_onednn_conv_matches_xla_values_and_gradients(kernel_shape, strides, padding, dilation):
    if not native.available():
        pytest.skip("oneDNN unavailable here (test_onednn_is_available_on_linux_x86_64 says why)")
    x, kernel = _random((3, 11, 10, kernel_shape[2]), 0), _random(kernel_shape, 1)
    (_, y_fast), grads_fast = _conv_loss_and_grads(cpu_ops.conv_general_dilated, x, kernel, strides, padding, dilation)
    (_, y_ref), grads_ref = _conv_loss_and_grads(lax.conv_general_dilated, x, kernel, strides, padding, dilation)
    jaxpr = str(jax.make_jaxpr(lambda x, k: cpu_ops.conv_general_dilated(x, k, strides, padding,
                                                                          rhs_dilation=dilation,
                                                                          dimension_numbers=NHWC))(x, kernel))
    assert "cbam_onednn_conv_forward" in jaxpr  # the oneDNN path was taken
    np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    _assert_trees_close(grads_fast, grads_ref, rtol=1e-5, atol=1e-5)


# Grouped (ResNeXt) and depthwise (MobileNet) convolutions as the models use them: 3x3, padding 1,
# strides 1 and 2. (kernel shape (KH, KW, Cin / G, Cout), strides, padding, G); G = Cin is depthwise.
GROUPED_CASES = [
    ((3, 3, 1, 16), (1, 1), ((1, 1), (1, 1)), 16),   # MobileNet depthwise
    ((3, 3, 1, 16), (2, 2), ((1, 1), (1, 1)), 16),   # MobileNet strided depthwise
    ((3, 3, 4, 8), (1, 1), ((1, 1), (1, 1)), 4),     # ResNeXt: 4 groups of 4 -> 2
    ((3, 3, 2, 24), (2, 2), ((1, 1), (1, 1)), 8),    # strided: 8 groups of 2 -> 3 (in and out per group differ)
    ((1, 1, 4, 18), (1, 1), ((0, 0), (0, 0)), 3),    # 1x1: 3 groups of 4 -> 6
    ((3, 3, 1, 32), (1, 1), ((1, 1), (1, 1)), 16),   # depthwise with channel multiplier 2
]


def _conv_uses(groups, x, kernel, strides, padding):
    """The custom calls and convolutions in the jaxpr of `cpu_ops.conv_general_dilated` and its gradient."""
    conv = lambda x, k: cpu_ops.conv_general_dilated(x, k, strides, padding, dimension_numbers=NHWC,
                                                     feature_group_count=groups)
    return str(jax.make_jaxpr(jax.value_and_grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1)))(x, kernel))


@pytest.mark.parametrize("kernel_shape, strides, padding, groups", GROUPED_CASES)
def test_onednn_grouped_conv_matches_xla_values_and_gradients(kernel_shape, strides, padding, groups):
    """oneDNN's grouped weights (G, Cout/G, Cin/G, KH, KW) in the hwigo layout are JAX's HWIO kernel:
    the same values and input and kernel gradients as XLA's grouped convolution."""
    if not native.available():
        pytest.skip("oneDNN unavailable here (test_onednn_is_available_on_linux_x86_64 says why)")
    x, kernel = _random((3, 11, 10, kernel_shape[2] * groups), 0), _random(kernel_shape, 1)
    (_, y_fast), grads_fast = _conv_loss_and_grads(cpu_ops.conv_general_dilated, x, kernel, strides, padding, (1, 1),
                                                   groups)
    (_, y_ref), grads_ref = _conv_loss_and_grads(lax.conv_general_dilated, x, kernel, strides, padding, (1, 1), groups)
    used = _conv_uses(groups, x, kernel, strides, padding)
    assert all(f"cbam_onednn_conv_{p}" in used for p in ("forward", "input_grad", "kernel_grad"))
    assert "conv_general_dilated" not in used  # no pass left to XLA
    np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    _assert_trees_close(grads_fast, grads_ref, rtol=1e-5, atol=1e-5)


def _bfloat16_values_and_grads(kernel_shape, strides, padding, dilation, groups=1):
    """(fast, reference): output, input and kernel gradient of `cpu_ops.conv_general_dilated` on bfloat16
    data, and XLA's float32 ones from the same bfloat16 inputs and output cotangent."""
    x = _random((4, 9, 9, kernel_shape[2] * groups), 0, jnp.bfloat16)
    kernel = _random(kernel_shape, 1, jnp.bfloat16)
    args = dict(rhs_dilation=dilation, dimension_numbers=NHWC, feature_group_count=groups)
    out_shape = jax.eval_shape(lambda: lax.conv_general_dilated(x, kernel, strides, padding, **args)).shape
    weights = _random(out_shape, 2, jnp.bfloat16)  # the output's cotangent, exact in bfloat16

    def value_and_grads(conv, x, kernel):
        def loss(x, kernel):
            y = conv(x, kernel, strides, padding, **args)
            return jnp.sum(y.astype(jnp.float32) * weights.astype(jnp.float32)), y

        (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, kernel)
        return y, *grads

    fast = value_and_grads(cpu_ops.conv_general_dilated, x, kernel)
    ref = value_and_grads(lax.conv_general_dilated, x.astype(jnp.float32), kernel.astype(jnp.float32))
    assert all(a.dtype == jnp.bfloat16 for a in fast)
    return tuple(a.astype(jnp.float32) for a in fast), ref


@pytest.mark.parametrize("kernel_shape, strides, padding, dilation", ONEDNN_CASES[:3])
def test_onednn_bfloat16_conv_matches_float32_within_bfloat16_rounding(kernel_shape, strides, padding, dilation):
    """bfloat16 in and out (AMX where the CPU has it), float32 accumulation: within a few bfloat16
    ulps (2^-8 relative) of the float32 result from the same bfloat16 inputs."""
    if not native.bfloat16_convolutions():
        pytest.skip("no oneDNN bfloat16 convolutions on this CPU")
    fast, ref = _bfloat16_values_and_grads(kernel_shape, strides, padding, dilation)
    _assert_trees_close(fast, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("kernel_shape, strides, padding, groups", GROUPED_CASES)
def test_onednn_bfloat16_grouped_conv_matches_float32_within_bfloat16_rounding(kernel_shape, strides, padding,
                                                                               groups):
    """As the ungrouped case: grouped and depthwise bfloat16 convolutions (oneDNN's depthwise kernel
    also for strided input gradients) within bfloat16 rounding of float32 XLA on the same inputs."""
    if not native.bfloat16_convolutions():
        pytest.skip("no oneDNN bfloat16 convolutions on this CPU")
    x, kernel = _random((2, 6, 6, kernel_shape[2] * groups), 0, jnp.bfloat16), _random(kernel_shape, 1, jnp.bfloat16)
    assert "cbam_onednn_conv_forward" in _conv_uses(groups, x, kernel, strides, padding)
    fast, ref = _bfloat16_values_and_grads(kernel_shape, strides, padding, (1, 1), groups)
    _assert_trees_close(fast, ref, rtol=1e-2, atol=1e-2)


def test_onednn_conv_under_vmap():
    if not native.available():
        pytest.skip("oneDNN unavailable here")
    x, kernel = _random((2, 3, 6, 6, 4), 0), _random((3, 3, 4, 8), 1)
    conv = lambda f, x: f(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    np.testing.assert_allclose(jax.vmap(lambda x: conv(cpu_ops.conv_general_dilated, x))(x),
                               jax.vmap(lambda x: conv(lax.conv_general_dilated, x))(x), rtol=1e-5, atol=1e-5)


def test_onednn_unavailable_falls_back_to_xla_with_one_warning(monkeypatch, tmp_path):
    """A failing build (here: a compiler that fails) warns once; the convolution is XLA's own."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CBAM_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")
    x, kernel = _random((2, 6, 6, 4), 0), _random((3, 3, 4, 8), 1)
    conv = lambda: cpu_ops.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
    with pytest.warns(RuntimeWarning, match="native CPU kernels") as caught:
        first, second = conv(), conv()
    assert len(caught) == 1
    assert "failed" in native._state["error"] and not list(tmp_path.rglob("*.so*"))  # no half-built library left
    np.testing.assert_allclose(first, lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                                               dimension_numbers=NHWC), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("shape, axis, dtype", [
    ((3, 5, 4, 700), (1, 2), jnp.float32),    # channel gate: over H, W; more channels than one 512 block
    ((2, 4, 3, 9), -1, jnp.float32),          # spatial gate: over C
    ((3, 2, 5, 6), 0, jnp.bfloat16),          # the stem max pool's stacked taps
])
def test_native_max_gradient_equals_xla_argmax_gradient(shape, axis, dtype):
    """Ties everywhere (small integers): both send each gradient to the first maximum, exactly."""
    if not native.available():
        pytest.skip("native kernels unavailable here")
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), dtype)
    weights = _random(jax.eval_shape(lambda: jnp.max(x, axis)).shape, 1, dtype)

    def grad(use_native):
        return jax.jit(jax.grad(lambda x: jnp.sum((max_over(x, axis, native=use_native) * weights).astype(jnp.float32))))(x)

    assert "cbam_max_grad" in str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(max_over(x, axis, native=True))))(x))
    np.testing.assert_array_equal(np.asarray(grad(True), np.float32), np.asarray(grad(False), np.float32))


@pytest.mark.parametrize("args, use_native", [
    (dict(feature_group_count=2, batch_group_count=1, lhs_dilation=(2, 2)), True),  # input dilation (transposed)
    (dict(feature_group_count=2, batch_group_count=1, lhs_dilation=(2, 2)), False),
    (dict(feature_group_count=1, batch_group_count=2, lhs_dilation=None), True),    # batch groups
    (dict(feature_group_count=1, batch_group_count=2, lhs_dilation=None), False),
    (dict(feature_group_count=2, batch_group_count=1, lhs_dilation=None), False),   # feature groups, no oneDNN
], ids=["input-dilation", "input-dilation-no-onednn", "batch-groups", "batch-groups-no-onednn",
        "feature-groups-no-onednn"])
def test_conv_hands_unsupported_settings_to_lax(args, use_native, monkeypatch):
    """Settings no fast path takes run as `lax.conv_general_dilated` itself (grouped convolutions need
    oneDNN: the matmul kernel gradient has no groups)."""
    monkeypatch.setattr(native, "ENABLED", use_native)
    monkeypatch.setattr(cpu_ops, "MAX_MATMUL_TAPS", 9)  # the matmul gradient would take a 3x3 kernel
    x = _random((2 * args["batch_group_count"], 6, 6, 8), 0)
    kernel = _random((3, 3, 8 // args["feature_group_count"], 8), 1)
    args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=NHWC, **args)
    grad = lambda conv: jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, **args))), argnums=(0, 1))
    jaxpr = str(jax.make_jaxpr(grad(cpu_ops.conv_general_dilated))(x, kernel))
    assert "cbam_onednn" not in jaxpr and "custom_vjp" not in jaxpr
    _assert_trees_close(grad(cpu_ops.conv_general_dilated)(x, kernel), grad(lax.conv_general_dilated)(x, kernel),
                        rtol=1e-6, atol=1e-6)


def test_onednn_conv_rejects_kernels_that_do_not_divide_the_channels():
    """The shim reads the feature groups off the shapes; channels that are no multiple of the kernel's
    input channels are an error of the custom call, not a wrong result."""
    if not native.available():
        pytest.skip("oneDNN unavailable here")
    x, kernel = _random((1, 4, 4, 6), 0), _random((3, 3, 4, 8), 1)
    with pytest.raises(Exception, match="feature groups"):
        jax.block_until_ready(native.conv(x, kernel, (1, 1), ((1, 1), (1, 1)), (1, 1)))


def test_conv_takes_the_matmul_gradient_only_up_to_max_taps(monkeypatch):
    x = _random((2, 6, 6, 4), 0)

    def kernel_grad_ops(kernel_shape):
        grad = jax.grad(lambda k: cpu_ops.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC).sum())
        return str(jax.make_jaxpr(grad)(_random(kernel_shape, 1)))

    monkeypatch.setattr(cpu_ops, "MAX_MATMUL_TAPS", 1)
    assert "custom_vjp" in kernel_grad_ops((1, 1, 4, 3)) and "custom_vjp" not in kernel_grad_ops((3, 3, 4, 3))
    monkeypatch.setattr(cpu_ops, "MAX_MATMUL_TAPS", 9)
    assert "custom_vjp" in kernel_grad_ops((3, 3, 4, 3))


def test_conv_bfloat16_kernel_gradient_keeps_dtype(monkeypatch):
    monkeypatch.setattr(cpu_ops, "MAX_MATMUL_TAPS", 9)
    x, kernel = _random((2, 8, 8, 4), 0, jnp.bfloat16), _random((3, 3, 4, 5), 1, jnp.bfloat16)
    conv = lambda f, k: f(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC).astype(jnp.float32).sum()
    grad_fast = jax.grad(lambda k: conv(cpu_ops.conv_general_dilated, k))(kernel)
    grad_ref = jax.grad(lambda k: conv(lax.conv_general_dilated, k))(kernel)
    assert grad_fast.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad_fast, np.float32), np.asarray(grad_ref, np.float32), rtol=2e-2, atol=0.1)


def _reference_batch_norm(x, scale, bias, epsilon):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * lax.rsqrt(var + epsilon) * scale + bias, mean, var


@pytest.mark.parametrize("channels", [6, 600])  # XLA's reductions; the native ones (two 512-channel blocks)
def test_batch_norm_train_gradient_includes_the_statistics(channels):
    """720 rows: the native reductions' three row chunks, the last one partial."""
    shape = (4, 20, 9, channels)
    x, scale, bias = _random(shape, 0) * 3 + 1, _random((channels,), 1), _random((channels,), 2)
    weights = _random(shape, 3)
    native_path = channels >= cpu_ops.NATIVE_NORM_MIN_CHANNELS and native.available()
    assert native_path == ("cbam_batch_norm_grad_sums" in str(jax.make_jaxpr(jax.grad(
        lambda x: jnp.sum(cpu_ops.batch_norm_train(x, scale, bias, 1e-5)[0] * weights)))(x)))

    def loss(norm, *args):  # depends on y, the mean and the variance
        y, mean, var = norm(*args, 1e-5)
        return jnp.sum(weights * y) + jnp.sum(jnp.sin(mean)) + jnp.sum(var**2)

    grads_fast = jax.grad(lambda *a: loss(cpu_ops.batch_norm_train, *a), argnums=(0, 1, 2))(x, scale, bias)
    grads_ref = jax.grad(lambda *a: loss(_reference_batch_norm, *a), argnums=(0, 1, 2))(x, scale, bias)
    _assert_trees_close(grads_fast, grads_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [5, 24])  # XLA's reductions, the native ones
@pytest.mark.parametrize("axis_name", [None, "devices"])
def test_batch_norm_module_matches_linen(axis_name, channels):
    """Same variables, outputs, running statistics and gradients as nn.BatchNorm (also over a mapped
    axis, where the native statistics are pooled across its members)."""
    options = dict(momentum=0.9, epsilon=1e-5, use_fast_variance=False, axis_name=axis_name,
                   scale_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
    # (mapped axis, B, H, W, C); the members' means differ, so pooling their variances matters
    x = _random((2, 4, 9, 10, channels), 0) * 2 + 0.5 + jnp.arange(2.0).reshape(2, 1, 1, 1, 1)
    weights = _random(x.shape, 1)

    def step(module_cls):
        module = module_cls(**options)
        variables = module.init(jax.random.PRNGKey(0), x[0], use_running_average=False)

        def loss(params, x, w):
            y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                      use_running_average=False, mutable=["batch_stats"])
            return jnp.sum(w * jnp.tanh(y)), updates

        grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        if axis_name is None:
            (_, updates), grads = grad_fn(variables["params"], x[0], weights[0])
        else:  # per-"device" gradients, as under pmap: each of the local loss, statistics over all
            (_, updates), grads = jax.vmap(grad_fn, in_axes=(None, 0, 0), axis_name=axis_name)(
                variables["params"], x, weights)
            updates = jax.tree.map(lambda u: u[0], updates)
        evaluated = module.apply({"params": variables["params"], **updates}, x[0], use_running_average=True)
        return variables, updates, grads, evaluated

    fast, ref = step(cpu_ops.BatchNorm), step(nn.BatchNorm)
    _assert_trees_close(fast[0], ref[0], rtol=0, atol=0)  # identical initial variables
    _assert_trees_close(fast[1:], ref[1:], rtol=1e-5, atol=1e-5)


def test_batch_norm_rejects_fast_variance():
    with pytest.raises(ValueError, match="use_fast_variance"):
        cpu_ops.BatchNorm(use_fast_variance=True).init(jax.random.PRNGKey(0), jnp.ones((2, 3)), use_running_average=False)


def test_implementation_option_is_checked():
    with pytest.raises(ValueError, match="implementation must be one of"):
        cpu_ops.use_cpu_path("fast")
    with pytest.raises(ValueError, match="implementation"):
        create_model("resnet18", implementation="fast")
    assert cpu_ops.use_cpu_path("auto") == (jax.default_backend() == "cpu")
    assert cpu_ops.use_cpu_path("cpu") and not cpu_ops.use_cpu_path("xla")


def test_names_from_before_0_1_are_unknown_options():
    """`kernels` and CBAM's `spatial_bn` were renamed before any release (`implementation`,
    `spatial_use_bn`); the old names are unknown options, named in the error."""
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['kernels'\]"):
        create_model("cbam_resnet18", kernels="xla")
    with pytest.raises(ValueError, match=r"Unknown option\(s\) \['spatial_bn'\]"):
        create_model("cbam_resnet18", spatial_bn=False)
    saved = model_config(create_model("cbam_resnet18", implementation="xla"))
    saved["kernels"] = saved.pop("implementation")
    with pytest.raises(ValueError, match=r"Unknown model config field\(s\) \['kernels'\]"):
        model_from_config(saved)


def _train_step(model, x, labels, variables=None):
    """Initial variables (`variables` or the model's own), then logits, updated BatchNorm statistics and
    gradients of one training step, and eval-mode logits after it."""
    if variables is None:
        variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)

    def loss(params):
        logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                      train=True, mutable=["batch_stats"])
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), (logits, updates)

    (_, (logits, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    evaluated = jax.jit(model.apply)({"params": variables["params"], **updates}, x)
    return variables, logits, updates, grads, evaluated


@pytest.mark.slow
@pytest.mark.parametrize("block, stem, size", [("basic", "cifar", 8), ("bottleneck", "imagenet", 32)])
def test_model_fast_path_equals_xla_path(block, stem, size):
    """Same parameter tree, logits, updated BatchNorm statistics and gradients on both paths.

    Two-stage CBAM-ResNets (official variant) cover every conv and BatchNorm the family has: both
    stems, basic and bottleneck blocks, strided and downsampling convs, the spatial gate.
    """
    x = _random((4, size, size, 3), 0)
    labels = jnp.arange(4) % 10

    def train_step(implementation):
        model = ResNet(stage_sizes=(1, 1), block=block, stem=stem, width=8, num_classes=10, attention="cbam",
                       attention_options={"reduction": 4, "spatial_bn_zero_init": False}, implementation=implementation)
        return _train_step(model, x, labels)

    fast, ref = train_step("cpu"), train_step("xla")
    _assert_trees_close(fast[0], ref[0], rtol=0, atol=0)
    _assert_trees_close(fast[1:], ref[1:], rtol=1e-4, atol=1e-5)


def _feature_groups(jaxpr: str) -> list[int]:
    """The feature_group_count of every XLA convolution in a jaxpr's text."""
    return [int(g) for g in re.findall(r"feature_group_count=(\d+)", jaxpr)]


def _largest_error(actual, expected) -> float:
    """The largest difference over all leaves, each relative to its leaf's largest magnitude (at least 1)."""
    return max(float(np.abs(np.asarray(a, np.float64) - e).max() / max(1.0, np.abs(e).max()))
               for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)))


class _ShortMobileNet(nn.Module):
    """A narrow CBAM-MobileNet's stem and first three stages (5 of its 13 units: depthwise convs of
    stride 1 and 2, CBAM after each conv) with a linear head: (B, H, W, 3) -> (B, 10) logits. The
    later stages repeat the same unit; all 13 cost ~100 s of compilation on two cores."""

    attention_options: dict
    implementation: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train=False):
        features, = MobileNet(width=8, attention="cbam", attention_options=self.attention_options,
                              implementation=self.implementation, dtype=self.dtype, features_only=True,
                              out_indices=(3,), name="mobilenet")(x, train)
        return nn.Dense(10, dtype=self.dtype, name="head")(jnp.mean(features, axis=(1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnext", "mobilenet"])
def test_grouped_families_fast_path_equals_xla_path(family):
    """A small CBAM-ResNeXt (4 groups in each bottleneck's 3x3) and a short CBAM-MobileNet (depthwise
    convs, strides 1 and 2, CBAM after each): every grouped convolution runs in oneDNN, and the logits,
    BatchNorm statistics and gradients are as close to float64's as XLA's own float32 ones are.

    Judged against float64 rather than directly: in a whole MobileNet (26 CBAMs, BatchNorm over a few
    positions in the last stages) float32 rounding alone moves gradients by 0.1% of a leaf's scale
    (seen: XLA 1.0e-3, oneDNN 0.7e-3; in the ResNeXt 2e-7 and 5e-7); a wrong group layout moves
    them by O(1).
    """
    if not native.available():
        pytest.skip("oneDNN unavailable here (test_onednn_is_available_on_linux_x86_64 says why)")
    x = _random((4, 64, 64, 3), 0)
    labels = jnp.arange(4) % 10
    options = {"reduction": 4, "spatial_bn_zero_init": False}

    def model(implementation, dtype=jnp.float32):
        if family == "resnext":
            return ResNet(stage_sizes=(1, 1), block="bottleneck", width=8, groups=4, base_width=16, num_classes=10,
                          attention="cbam", attention_options=options, implementation=implementation, dtype=dtype)
        return _ShortMobileNet(options, implementation, dtype)

    def grad_jaxpr(implementation):
        grad = jax.grad(lambda v, x: model(implementation).apply(v, x, train=True, mutable=["batch_stats"])[0].sum())
        return str(jax.make_jaxpr(grad)(variables, x))

    variables = jax.eval_shape(model("xla").init, jax.random.PRNGKey(0), x)
    assert max(_feature_groups(grad_jaxpr("xla"))) > 1  # the model has grouped convolutions ...
    assert set(_feature_groups(grad_jaxpr("cpu"))) == {1}  # ... and the fast path runs none of them in XLA
    fast, ref = _train_step(model("cpu"), x, labels), _train_step(model("xla"), x, labels)
    _assert_trees_close(fast[0], ref[0], rtol=0, atol=0)  # the same initial variables
    with jax.enable_x64(True):  # from the same initial variables, in float64
        variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), fast[0])
        exact = _train_step(model("xla", jnp.float64), x.astype(jnp.float64), labels, variables64)[1:]
    exact = jax.tree.map(lambda a: np.asarray(a, np.float64), exact)
    # within the 1e-5 of the other equality tests, or twice XLA's own error where the network amplifies rounding
    assert _largest_error(fast[1:], exact) <= max(1e-5, 2 * _largest_error(ref[1:], exact))


def _torch_max_pool_grad(x: np.ndarray, grad: np.ndarray, window: int, stride: int, padding: int) -> np.ndarray:
    """PyTorch max_pool2d's input gradient: each output's gradient to the first maximum of its window
    in row-major scanning order (-inf padding)."""
    padded = np.pad(x, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)), constant_values=-np.inf)
    out = np.zeros_like(padded)
    for b, i, j, c in np.ndindex(grad.shape):
        patch = padded[b, i * stride:i * stride + window, j * stride:j * stride + window, c]
        di, dj = np.unravel_index(np.argmax(patch), patch.shape)
        out[b, i * stride + di, j * stride + dj, c] += grad[b, i, j, c]
    return out[:, padding:padding + x.shape[1], padding:padding + x.shape[2]]


@pytest.mark.parametrize("shape, window, stride, padding", [((2, 9, 8, 3), 3, 2, 1), ((1, 6, 7, 2), 2, 2, 0),
                                                            ((1, 5, 5, 2), 3, 1, 1)])
def test_max_pool_matches_pytorch_forward_and_gradient(shape, window, stride, padding):
    """Ties everywhere (small integers, as after a ReLU): the gradient follows PyTorch's first-maximum rule."""
    x = np.random.default_rng(0).integers(0, 3, shape).astype(np.float32)
    pool = functools.partial(cpu_ops.max_pool, window=window, stride=stride, padding=padding)
    out = jax.jit(pool)(x)
    expected = nn.max_pool(jnp.asarray(x), (window, window), strides=(stride, stride), padding=((padding, padding),) * 2)
    np.testing.assert_array_equal(out, expected)
    grad_out = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pool(x) * grad_out)))(x)
    np.testing.assert_allclose(grad, _torch_max_pool_grad(x, grad_out, window, stride, padding), rtol=1e-6, atol=1e-6)


def _needs_native():
    if not native.available():
        pytest.skip("native kernels unavailable here")


def _bfloat16_ulps(actual, expected) -> float:
    """The largest |actual - expected| in bfloat16 ulps of max(|expected|, the smallest normal)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(expected), 2.0 ** -126))) - 7)
    return float(np.max(np.abs(actual - expected) / ulp))


def _assert_pool_gradients_close(grad, grad_ref, dtype) -> None:
    """Overlapping windows send gradients to the same first maxima, summed in another order: float32
    within float32 rounding; bfloat16 the float32 sums rounded once (within half an ulp)."""
    if dtype == jnp.float32:
        np.testing.assert_allclose(grad, grad_ref, rtol=1e-6, atol=1e-6)
    else:
        assert _bfloat16_ulps(grad, grad_ref) <= 0.5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape, window, stride, padding", [((2, 11, 10, 70), 3, 2, 1), ((1, 6, 7, 5), 2, 2, 0),
                                                            ((2, 5, 6, 33), 3, 1, 1)])
@pytest.mark.parametrize("low", [0, -3])  # as after a ReLU; all negative: the padding must never win
def test_native_max_pool_equals_the_separable_pool(shape, window, stride, padding, dtype, low, monkeypatch):
    """Ties everywhere (small integers), channels beyond one 32-channel block: the same maxima and
    each gradient at the same first maximum; overlapping windows sum in float32, so bfloat16
    gradients are the float32 sums rounded once (within one ulp)."""
    _needs_native()
    x = jnp.asarray(np.random.default_rng(0).integers(low, low + 3, shape), dtype)
    pool = functools.partial(cpu_ops.max_pool, window=window, stride=stride, padding=padding)
    grad_out = _random(jax.eval_shape(pool, x).shape, 1, dtype)

    def values_and_grad(x, grad_out):
        out, vjp = jax.vjp(pool, x)
        return out, vjp(grad_out)[0]

    assert "cbam_max_pool_grad" in str(jax.make_jaxpr(values_and_grad)(x, grad_out))
    out, grad = jax.jit(values_and_grad)(x, grad_out)
    monkeypatch.setattr(native, "ENABLED", False)  # the separable pool, in float32

    def reference(x, grad_out):  # a function of its own: jit would reuse values_and_grad's native trace
        return values_and_grad(x, grad_out)

    x32, grad_out32 = x.astype(jnp.float32), grad_out.astype(jnp.float32)
    assert "cbam_max_pool" not in str(jax.make_jaxpr(reference)(x32, grad_out32))
    out_ref, grad_ref = jax.jit(reference)(x32, grad_out32)
    assert out.dtype == grad.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), out_ref)
    _assert_pool_gradients_close(grad, grad_ref, dtype)


def test_native_max_pool_propagates_nan():
    _needs_native()
    x = np.zeros((1, 4, 4, 3), np.float32)
    x[0, 1, 1, 0] = np.nan
    out = jax.jit(lambda x: native.max_pool(x, 2, 2, 0))(x)
    assert np.isnan(out[0, 0, 0, 0]) and np.isnan(out).sum() == 1


def _pools_and_gate(x, s):
    """The XLA formulation: mean and first-maximum max along axis 1 in float32, then x * s (x's dtype)."""
    x32 = x.astype(jnp.float32)
    return jnp.mean(x32, 1), max_over(x32, 1), x * s[:, None, :].astype(x.dtype)


def _native_pools_and_gate(x, s):
    return (*native.avg_max(x), native.gate(x, s))


@pytest.mark.parametrize("shape", [(3, 130, 700), (2, 64, 5), (4, 7, 1)])  # chunks of 64 rows, blocks of 512
def test_native_gate_kernels_equal_xla_in_float32(shape):
    """Values and gradients of both pools and of the gate's product, from the same cotangents; ties
    everywhere, so the max gradient must pick the same first maximum."""
    _needs_native()
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, shape), jnp.float32)
    s = jax.nn.sigmoid(_random((shape[0], shape[2]), 1))
    cotangents = (_random((shape[0], shape[2]), 2), _random((shape[0], shape[2]), 3), _random(shape, 4))

    def values_and_grads(f):
        out, vjp = jax.vjp(f, x, s)
        return out, vjp(cotangents)

    fast = jax.jit(lambda: values_and_grads(_native_pools_and_gate))()
    assert "cbam_gate_grad" in str(jax.make_jaxpr(lambda: values_and_grads(_native_pools_and_gate))())
    ref = jax.jit(lambda: values_and_grads(_pools_and_gate))()
    _assert_trees_close(fast, ref, rtol=1e-6, atol=1e-6)


def test_native_gate_kernels_in_bfloat16_are_float32_sums_rounded_once():
    """bfloat16 x and cotangent: the kernels accumulate in float32, so each result is the float32
    computation from the same bfloat16 inputs, rounded once to the output's type: the pools and the
    scale's gradient (float32) within float32 rounding, x's gradients within half a bfloat16 ulp."""
    _needs_native()
    shape = (3, 130, 600)
    x = _random(shape, 0, jnp.bfloat16)
    s = jax.nn.sigmoid(_random((shape[0], shape[2]), 1))
    d_mean, d_max, d_y = _random(s.shape, 2), _random(s.shape, 3), _random(shape, 4, jnp.bfloat16)
    x32, d_y32, s_rounded = x.astype(jnp.float32), d_y.astype(jnp.float32), s.astype(jnp.bfloat16).astype(jnp.float32)

    (mean, peak), pools_vjp = jax.vjp(native.avg_max, x)
    (mean_ref, peak_ref), pools_vjp_ref = jax.vjp(lambda x: (jnp.mean(x, 1), max_over(x, 1)), x32)
    np.testing.assert_array_equal(peak, peak_ref)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    dx, = pools_vjp((d_mean, d_max))
    assert dx.dtype == jnp.bfloat16
    assert _bfloat16_ulps(dx, pools_vjp_ref((d_mean, d_max))[0]) <= 0.5

    y, gate_vjp = jax.vjp(native.gate, x, s)
    np.testing.assert_array_equal(np.asarray(y, np.float32), (x32 * s_rounded[:, None, :]).astype(jnp.bfloat16))
    dx, ds = gate_vjp(d_y)
    assert dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32
    # products of two bfloat16 numbers are exact in float32: one rounding
    np.testing.assert_array_equal(np.asarray(dx, np.float32), (d_y32 * s_rounded[:, None, :]).astype(jnp.bfloat16))
    np.testing.assert_allclose(ds, jnp.sum(d_y32 * x32, 1), rtol=1e-5, atol=1e-5 * float(np.abs(ds).max()))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channel_gate_cpu_path_runs_the_native_kernels_and_matches_xla(dtype):
    """The CBAM channel gate on the CPU path pools and differentiates its product natively; its
    values and gradients equal the XLA path's in float32 and its bfloat16 gradients err no more than
    the XLA path's own bfloat16 ones (measured against float32 from the same inputs)."""
    _needs_native()
    from cbam_jax.layers import ChannelGate

    x = _random((2, 9, 10, 48), 0, dtype)

    def values_and_grads(implementation, x):
        gate = ChannelGate(reduction=4, implementation=implementation)
        variables = gate.init(jax.random.key(0), x)
        return jax.value_and_grad(lambda v, x: jnp.sum(jnp.sin(gate.apply(v, x).astype(jnp.float32))),
                                  argnums=(0, 1))(variables, x)

    jaxpr = str(jax.make_jaxpr(functools.partial(values_and_grads, "cpu"))(x))
    assert "cbam_avg_max" in jaxpr and "cbam_gate_grad" in jaxpr
    fast = jax.jit(functools.partial(values_and_grads, "cpu"))(x)
    ref = jax.jit(functools.partial(values_and_grads, "xla"))(x)
    if dtype == jnp.float32:
        _assert_trees_close(fast, ref, rtol=1e-5, atol=1e-6)
        return
    # The gradients (the loss itself is the same bfloat16 forward pass on both paths, up to which
    # way a pooled mean's last bit rounds the gate): float32 sums err less than XLA's bfloat16 ones.
    exact = jax.jit(functools.partial(values_and_grads, "xla"))(x.astype(jnp.float32))
    for f, r, e in zip(*(jax.tree.leaves(grads) for _, grads in (fast, ref, exact))):
        error, ref_error = (float(np.abs(np.asarray(a, np.float32) - np.asarray(e)).max()) for a in (f, r))
        assert error <= ref_error


def test_native_batch_norm_in_bfloat16_is_the_float32_computation_rounded_once():
    """bfloat16 x, y and output gradient (as in a bfloat16 ResNet): the statistics and the parameter
    gradients are float32 sums of the bfloat16 data, within float32 rounding of float64 ones; y and
    x's gradient within one bfloat16 ulp of the largest value of the float32 computation."""
    _needs_native()
    shape, channels = (4, 20, 9, 48), 48
    x = (_random(shape, 0) * 3 + 1).astype(jnp.bfloat16)
    scale, bias, grad_y = _random((channels,), 1), _random((channels,), 2), _random(shape, 3, jnp.bfloat16)

    def values_and_grads(x, grad_y, dtype):
        (y, mean, var), vjp = jax.vjp(lambda x, s, b: cpu_ops.batch_norm_train(x, s, b, 1e-5, None, dtype), x, scale, bias)
        return (y, mean, var), vjp((grad_y, jnp.zeros_like(mean), jnp.zeros_like(var)))

    (y, mean, var), (dx, dscale, dbias) = jax.jit(functools.partial(values_and_grads, dtype=jnp.bfloat16))(x, grad_y)
    assert "cbam_batch_stats" in str(jax.make_jaxpr(functools.partial(values_and_grads, dtype=jnp.bfloat16))(x, grad_y))
    assert y.dtype == dx.dtype == jnp.bfloat16 and mean.dtype == dscale.dtype == jnp.float32
    x64, g64 = np.asarray(x, np.float64), np.asarray(grad_y, np.float64)
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=1e-5)
    normalised = (x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose(dbias, g64.sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dscale, (g64 * normalised).sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
    # the float32 computation from the same bfloat16 data
    (y_ref, _, _), (dx_ref, _, _) = jax.jit(functools.partial(values_and_grads, dtype=jnp.float32))(
        x.astype(jnp.float32), grad_y.astype(jnp.float32))
    for fast, ref in ((y, y_ref), (dx, dx_ref)):
        ulp = 2.0 ** (np.floor(np.log2(np.abs(np.asarray(ref)).max())) - 7)
        assert np.abs(np.asarray(fast, np.float64) - np.asarray(ref, np.float64)).max() <= ulp


def test_native_batch_statistics_of_data_far_from_zero():
    """Values 1000 +- 0.01 (mean / std 1e5): the variance within float32 rounding of the float64 one
    of the same float32 data, where squared deviations from a rounded mean would be off by ~1e-5."""
    _needs_native()
    x = (1000 + 0.01 * np.random.default_rng(0).standard_normal((1000, 16))).astype(np.float32)
    mean, var = jax.jit(native.batch_stats)(x)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-7)
    np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-6)


def test_maps_of_2_to_the_24_positions_keep_xla_and_the_kernels_refuse_them():
    """The native gate and pool kernels track positions as float32 (exact below 2^24): a channel gate
    or stem pool over that many positions takes XLA's path, and the kernels refuse rather than
    send a gradient to the wrong position."""
    _needs_native()
    from cbam_jax.layers import ChannelGate

    def jaxpr_of_grad(f, shape):
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        return str(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(f(x))))(x))

    gate = ChannelGate(reduction=1, implementation="cpu")
    variables = jax.eval_shape(gate.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 2, 2, 1), jnp.float32))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
    pool = functools.partial(cpu_ops.max_pool, window=3, stride=2, padding=1)
    for f, name in ((functools.partial(gate.apply, variables), "cbam_gate_grad"), (pool, "cbam_max_pool_grad")):
        assert name in jaxpr_of_grad(f, (1, 4096, 4095, 1))
        assert name not in jaxpr_of_grad(f, (1, 4096, 4096, 1))
    x = jnp.zeros((1, 2**24, 1), jnp.float32)
    with pytest.raises(Exception, match="N must be below 2"):
        jax.block_until_ready(jax.vjp(native.avg_max, x)[1]((jnp.ones((1, 1)), jnp.ones((1, 1)))))
    x = jnp.zeros((1, 4096, 4096, 1), jnp.float32)
    with pytest.raises(Exception, match="H \\* W must be below 2"):
        jax.block_until_ready(jax.vjp(lambda x: native.max_pool(x, 3, 2, 1), x)[1](jnp.ones((1, 2048, 2048, 1))))


def _shaped(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


# (handler, outputs, operands, attributes): each one buffer off by its shape, dtype or emptiness.
_pool = {"window": np.int64(3), "stride": np.int64(2), "padding": np.int64(1)}
WRONG_CALLS = [
    ("max_grad", _shaped((4, 3, 8)), (jnp.ones((4, 3, 8)), jnp.ones((1, 8))), {}),
    ("avg_max", (_shaped((4, 8)), _shaped((1, 8))), (jnp.ones((4, 3, 8)),), {}),
    ("avg_max_grad", _shaped((4, 3, 8)), (jnp.ones((4, 3, 8)), jnp.ones((4, 8)), jnp.ones((8,))), {}),
    ("gate_grad", (_shaped((4, 3, 8)), _shaped((4, 8))), (jnp.ones((4, 3, 8)), jnp.ones((4, 3, 8)), jnp.ones((1, 8))), {}),
    ("gate_grad", (_shaped((4, 3, 8)), _shaped((4, 8))), (jnp.ones((4, 3, 8)), jnp.ones((4, 1, 8)), jnp.ones((4, 8))), {}),
    ("max_pool", _shaped((1, 5, 5, 3)), (jnp.ones((1, 6, 6, 3)),), _pool),  # 6 pools to 3, not 5
    ("max_pool", _shaped((1, 3, 3, 3)), (jnp.ones((1, 6, 6, 3)),), {**_pool, "padding": np.int64(3)}),
    ("max_pool_grad", _shaped((1, 6, 6, 3), jnp.bfloat16), (jnp.ones((1, 6, 6, 3)), jnp.ones((1, 3, 3, 3))), _pool),
    ("batch_stats", (_shaped((4,)), _shaped((5,))), (jnp.ones((7, 4)),), {}),
    ("batch_norm_grad_sums", (_shaped((4,)), _shaped((4,))), (jnp.ones((7, 4)), jnp.ones((7, 4)), jnp.ones(())), {}),
    ("batch_norm_grad_sums", (_shaped((4,)), _shaped((4,))), (jnp.ones((7, 4)), jnp.ones((6, 4)), jnp.ones((4,))), {}),
    ("batch_stats", (_shaped((4,)), _shaped((4,))), (jnp.ones((0, 4)),), {}),
    ("avg_max", (_shaped((4, 8)), _shaped((4, 8))), (jnp.ones((4, 0, 8)),), {}),
]


@pytest.mark.parametrize("name, outputs, operands, attributes", WRONG_CALLS,
                         ids=[f"{call[0]}-{i}" for i, call in enumerate(WRONG_CALLS)])
def test_native_handlers_refuse_buffers_of_other_shapes(name, outputs, operands, attributes):
    """Every handler checks every buffer's shape and dtype (and refuses empty inputs, whose reductions
    have no first element): a wrong call is an error, never a read or write outside a buffer."""
    _needs_native()
    with pytest.raises(Exception, match=f"{name}: (expected|x must not be empty)"):
        jax.block_until_ready(native._elementwise_call(name, outputs, *operands, **attributes))


def test_native_wrappers_check_shapes_and_empty_inputs_keep_xla():
    """The wrappers name a wrongly shaped operand at trace time (a broadcastable gate (1, Q) included);
    empty arrays are not `usable_for` the kernels, so the layers give XLA's results for them."""
    _needs_native()
    x = jnp.ones((4, 3, 8))
    with pytest.raises(ValueError, match=r"native.gate: s must have shape \(4, 8\), got \(1, 8\)"):
        jax.grad(lambda s: jnp.sum(native.gate(x, s)))(jnp.ones((1, 8)))
    with pytest.raises(ValueError, match=r"native.max_grad: grad must have shape \(4, 8\)"):
        native.max_grad(x, jnp.ones((8,)))
    with pytest.raises(ValueError, match=r"native.batch_norm_grad_sums: mean must have shape \(8,\)"):
        native.batch_norm_grad_sums(x[0], x[0], jnp.zeros(()))
    empty = jnp.ones((1, 0, 5, 3))
    assert not native.usable_for(empty) and native.usable_for(jnp.ones((1, 1, 5, 3)))
    pooled = jax.jit(functools.partial(cpu_ops.max_pool, window=2, stride=1, padding=1))(empty)  # windows of padding
    assert pooled.shape == (1, 1, 6, 3)
    np.testing.assert_array_equal(pooled, nn.max_pool(empty, (2, 2), strides=(1, 1), padding=((1, 1), (1, 1))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_native_max_gradients_go_to_the_first_nan_as_xla(dtype, monkeypatch):
    """NaN counts as the maximum and the gradient goes to the first NaN of each window or column,
    after +inf and -inf alike, as in the XLA paths (jnp.argmax): pooled values NaN where the window
    holds one, gradients equal."""
    _needs_native()
    x = np.random.default_rng(0).integers(-2, 3, (2, 7, 6, 40)).astype(np.float32)
    x[0, 1, 1, :20] = np.inf
    x[0, 1, 2, 10:30] = np.nan  # after an inf in the same windows, for half of these channels
    x[0, 2, 1, 15:25] = np.nan  # a second NaN in some windows: not the first in row-major order
    x[1, 4, 3, ::3] = -np.inf
    x = jnp.asarray(x, dtype)
    grad_out = _random((2, 4, 3, 40), 1, dtype)
    pool = functools.partial(cpu_ops.max_pool, window=3, stride=2, padding=1)

    def pool_and_grad(x, grad_out):
        out, vjp = jax.vjp(pool, x)
        return out, vjp(grad_out)[0]

    def pools_and_grads(x, d):
        flat = x.reshape(2, 42, 40)
        (mean, peak), vjp = jax.vjp(lambda x: (jnp.mean(x.astype(jnp.float32), 1), max_over(x, 1)), flat)
        return peak, vjp((jnp.zeros_like(mean), d))[0]

    def native_pools_and_grads(x, d):
        (mean, peak), vjp = jax.vjp(native.avg_max, x.reshape(2, 42, 40))
        return peak, vjp((jnp.zeros_like(mean), d.astype(jnp.float32)))[0]

    d = _random((2, 40), 2)
    fast = jax.jit(pool_and_grad)(x, grad_out), jax.jit(native_pools_and_grads)(x, d)
    assert "cbam_max_pool_grad" in str(jax.make_jaxpr(pool_and_grad)(x, grad_out))
    monkeypatch.setattr(native, "ENABLED", False)  # XLA's paths; a new function, not pool_and_grad's cached trace
    (out, grad), (peak, column_grad) = fast
    out_ref, grad_ref = jax.jit(lambda *a: pool_and_grad(*a))(x.astype(jnp.float32), grad_out.astype(jnp.float32))
    peak_ref, column_grad_ref = jax.jit(pools_and_grads)(x, d.astype(dtype))
    assert np.isnan(np.asarray(out, np.float32)).sum() == np.isnan(np.asarray(out_ref)).sum() > 0
    np.testing.assert_array_equal(np.asarray(out, np.float32), out_ref)
    np.testing.assert_array_equal(peak, np.asarray(peak_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(column_grad, np.float32), np.asarray(column_grad_ref, np.float32))
    _assert_pool_gradients_close(grad, grad_ref, dtype)
