"""The paper's design space (Sec. 4.1) as layer options: the spatial descriptor and the arrangement
of the two gates, against NumPy versions of their formulas; defaults unchanged bit for bit;
parameter counts by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util
from tests.helpers import count_params, randomize, to_numpy

from tests import numpy_reference as ref
from cbam_jax import CBAM, ChannelGate, ResNet, SpatialGate, create_model
from cbam_jax.convert import ConversionError, to_numpy_state_dict
from cbam_jax.layers import cpu_ops, native

SHAPE = (3, 5, 7, 32)  # non-square: catches H/W mix-ups
TOL = dict(rtol=1e-5, atol=1e-5)


def _setup(layer, x, seed=1):
    variables = randomize(layer.init(jax.random.key(0), jnp.asarray(x)), seed)
    return variables, to_numpy(variables)


def _bn(p, name="bn"):
    return p["params"][name]["scale"], p["params"][name]["bias"], p["batch_stats"][name]["mean"], p["batch_stats"][name]["var"]


# ----------------------------------------------------------------------------- spatial descriptor


@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_conv1x1_descriptor_matches_formula(rng, kernel_size, use_bn, train):
    """sigmoid(BN(conv_k(x @ w))) * x: a 1x1 conv C -> 1 (no bias) replaces the two channel pools."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    layer = SpatialGate(kernel_size=kernel_size, use_bn=use_bn, descriptor="conv1x1")
    variables, p = _setup(layer, x)
    assert set(p["params"]["compress"]) == {"kernel"}  # no bias
    assert p["params"]["compress"]["kernel"].shape == (1, 1, 32, 1)
    assert p["params"]["conv"]["kernel"].shape == (kernel_size, kernel_size, 1, 1)
    out, _ = layer.apply(variables, x, train=train, mutable=["batch_stats"])
    expected = ref.spatial_gate(x.astype(np.float64), p["params"]["conv"]["kernel"], bn=_bn(p) if use_bn else None,
                                train=train, compress=p["params"]["compress"]["kernel"][0, 0])
    np.testing.assert_allclose(out, expected, **TOL)


def test_conv1x1_descriptor_ignores_pool_order_and_starts_at_input_scale(rng):
    x = rng.normal(size=(8, 6, 6, 64)).astype(np.float32)
    variables = SpatialGate(descriptor="conv1x1").init(jax.random.key(0), x)
    other = SpatialGate(descriptor="conv1x1", pool_order="mean_max")
    np.testing.assert_array_equal(SpatialGate(descriptor="conv1x1").apply(variables, x), other.apply(variables, x))
    # PyTorch's default conv init U(+-1/sqrt(C)): the descriptor's std is ~1/sqrt(3) of the input's.
    kernel = np.asarray(variables["params"]["compress"]["kernel"])
    assert np.abs(kernel).max() <= 1 / np.sqrt(64)
    assert 0.4 < np.std(x @ kernel[0, 0]) < 0.8


# ----------------------------------------------------------------------------- arrangement


@pytest.mark.parametrize("arrangement", ["channel_first", "spatial_first", "parallel"])
@pytest.mark.parametrize("descriptor", ["pool", "conv1x1"])
@pytest.mark.parametrize("train", [False, True])
def test_cbam_arrangement_matches_formula(rng, arrangement, descriptor, train):
    x = rng.normal(size=SHAPE).astype(np.float32)
    layer = CBAM(reduction=4, arrangement=arrangement, spatial_descriptor=descriptor)
    variables, p = _setup(layer, x)
    out, updates = layer.apply(variables, x, train=train, mutable=["batch_stats"])
    fc1, fc2 = p["params"]["channel"]["fc1"], p["params"]["channel"]["fc2"]
    spatial = {"params": p["params"]["spatial"], "batch_stats": p["batch_stats"]["spatial"]}
    compress = spatial["params"]["compress"]["kernel"][0, 0] if descriptor == "conv1x1" else None
    spatial_inputs = []

    def channel(y):
        return ref.channel_logits(y, fc1["kernel"], fc2["kernel"], fc1["bias"], fc2["bias"])

    def spatial_logits(y):
        spatial_inputs.append(y)
        return ref.spatial_logits(y, spatial["params"]["conv"]["kernel"], "max_mean", _bn(spatial), train, compress)

    expected = ref.cbam(x.astype(np.float64), channel, spatial_logits, arrangement)
    np.testing.assert_allclose(out, expected, **TOL)
    if train:  # the spatial BatchNorm's statistics come from the spatial gate's own input
        (gate_input,) = spatial_inputs
        descriptor_map = (np.stack([gate_input.max(-1), gate_input.mean(-1)], -1) if compress is None
                          else gate_input @ compress)
        conv_out = ref.conv2d(descriptor_map, spatial["params"]["conv"]["kernel"], padding=3)
        expected_mean = 0.99 * spatial["batch_stats"]["bn"]["mean"] + 0.01 * conv_out.mean(axis=(0, 1, 2))
        np.testing.assert_allclose(updates["batch_stats"]["spatial"]["bn"]["mean"], expected_mean, **TOL)


def test_arrangements_differ_and_share_parameters(rng):
    x = rng.normal(size=SHAPE).astype(np.float32)
    variables = randomize(CBAM(reduction=4).init(jax.random.key(0), x))
    outputs = {}
    for arrangement in ("channel_first", "spatial_first", "parallel"):
        layer = CBAM(reduction=4, arrangement=arrangement)
        shapes = jax.tree.map(lambda a: a.shape, layer.init(jax.random.key(0), x))
        assert shapes == jax.tree.map(lambda a: a.shape, variables)
        outputs[arrangement] = np.asarray(layer.apply(variables, x))
    assert np.abs(outputs["channel_first"] - outputs["spatial_first"]).max() > 1e-3
    assert np.abs(outputs["channel_first"] - outputs["parallel"]).max() > 1e-3


@pytest.mark.parametrize("arrangement", ["channel_first", "spatial_first", "parallel"])
def test_sown_maps_are_each_gates_own_map(rng, arrangement):
    """predict/visualize read channel/.../channel_attention and spatial/.../spatial_attention."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    layer = CBAM(reduction=4, arrangement=arrangement)
    variables, p = _setup(layer, x)
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    (channel_map,) = state["intermediates"]["channel"]["channel_attention"]
    (spatial_map,) = state["intermediates"]["spatial"]["spatial_attention"]
    assert channel_map.shape == (3, 32) and spatial_map.shape == (3, 5, 7)
    fc1, fc2 = p["params"]["channel"]["fc1"], p["params"]["channel"]["fc2"]
    x64 = x.astype(np.float64)

    def channel(y):
        return ref.sigmoid(ref.channel_logits(y, fc1["kernel"], fc2["kernel"], fc1["bias"], fc2["bias"]))

    def spatial(y):
        bn = _bn({"params": p["params"]["spatial"], "batch_stats": p["batch_stats"]["spatial"]})
        return ref.sigmoid(ref.spatial_logits(y, p["params"]["spatial"]["conv"]["kernel"], "max_mean", bn))

    if arrangement == "channel_first":
        expected_channel = channel(x64)
        expected_spatial = spatial(x64 * expected_channel)
    elif arrangement == "spatial_first":
        expected_spatial = spatial(x64)
        expected_channel = channel(x64 * expected_spatial)
    else:
        expected_channel, expected_spatial = channel(x64), spatial(x64)
    np.testing.assert_allclose(channel_map, expected_channel[:, 0, 0, :], **TOL)
    np.testing.assert_allclose(spatial_map, expected_spatial[..., 0], **TOL)


@pytest.mark.parametrize("arrangement", ["spatial_first", "parallel"])
def test_low_precision_arrangements_keep_the_dtype(rng, arrangement):
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.bfloat16)
    layer = CBAM(reduction=4, arrangement=arrangement, spatial_descriptor="conv1x1", dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), x)
    out = layer.apply(variables, x)
    assert out.dtype == jnp.bfloat16
    reference = CBAM(reduction=4, arrangement=arrangement, spatial_descriptor="conv1x1").apply(
        variables, x.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(np.float32), reference, rtol=0.05, atol=0.05)


def test_create_model_passes_the_options_through():
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=16, arrangement="parallel",
                         spatial_descriptor="conv1x1", kernel_size=3)
    assert model.attention_options["arrangement"] == "parallel"
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    spatial = variables["params"]["layer1_0"]["attention"]["spatial"]
    assert spatial["compress"]["kernel"].shape == (1, 1, 16, 1) and spatial["conv"]["kernel"].shape == (3, 3, 1, 1)


@pytest.mark.parametrize("layer, message", [
    (CBAM(arrangement="sequential"), "arrangement must be one of"),
    (CBAM(spatial_descriptor="conv"), "spatial_descriptor must be one of"),
    (SpatialGate(descriptor="avg"), "descriptor must be one of"),
])
def test_bad_options_are_a_clear_value_error(layer, message):
    with pytest.raises(ValueError, match=message):
        layer.init(jax.random.key(0), jnp.zeros((2, 8, 8, 32)))


def test_bad_option_fails_in_a_model_too():
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=16, arrangement="paralel")
    with pytest.raises(ValueError, match="arrangement must be one of"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


@pytest.mark.parametrize("options, exports", [({"arrangement": "parallel"}, False), ({"arrangement": "spatial_first"}, False),
                                              ({"spatial_descriptor": "conv1x1"}, False), ({}, True)])
def test_designs_the_pytorch_codes_lack_do_not_export(options, exports):
    """Same parameter shapes (parallel, spatial_first) must not make a silently different PyTorch model."""
    model = create_model("cbam_resnet18", num_classes=10, stem="cifar", width=8, reduction=4, **options)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    variables = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    if exports:
        assert "layer1.0.cbam.SpatialGate.spatial.conv.weight" in to_numpy_state_dict(variables, arch=model)
    else:
        with pytest.raises(ConversionError, match="has no PyTorch layout"):
            to_numpy_state_dict(variables, arch=model)


# ----------------------------------------------------------------------------- parameter counts


# CBAM-ResNet-50: 16 blocks with C = 256 (3), 512 (4), 1024 (6), 2048 (3) channels at the gate.
R50_GATE_CHANNELS = [256] * 3 + [512] * 4 + [1024] * 6 + [2048] * 3
R50_OFFICIAL = 28_089_624  # the paper's 28.09M; spatial gate per block: 7*7*2 conv + 2 BN = 100


# The attention rows of the paper's ablation (configs/ablation.py) in the ResNet-50: row -> (its options
# against the official CBAM, the parameters that changes in each block's CBAM of C channels).
# docs/ablation.md quotes these counts (tests/test_docs.py checks it).
R50_DESIGNS = {
    # a 1x1 conv C -> 1 (C weights) and a k x k conv with one input channel instead of two
    "conv1x1_k7": ({"spatial_descriptor": "conv1x1"}, lambda c: c + 7 * 7 - 7 * 7 * 2),
    "conv1x1_k3": ({"spatial_descriptor": "conv1x1", "kernel_size": 3}, lambda c: c + 3 * 3 - 7 * 7 * 2),
    "pool_k3": ({"kernel_size": 3}, lambda c: 3 * 3 * 2 - 7 * 7 * 2),
    "cbam": ({}, lambda c: 0),
    "spatial_first": ({"arrangement": "spatial_first"}, lambda c: 0),
    "parallel": ({"arrangement": "parallel"}, lambda c: 0),
    "channel_avgmax": ({"use_spatial": False}, lambda c: -(7 * 7 * 2 + 2)),
    "channel_max": ({"use_spatial": False, "pool_types": ("max",)}, lambda c: -(7 * 7 * 2 + 2)),  # one MLP for any pools
    "channel_avg": ({"use_spatial": False, "pool_types": ("avg",)}, lambda c: -(7 * 7 * 2 + 2)),
}


def r50_parameters(row: str) -> int:
    """The parameters of the ablation row `row` (an attention row of R50_DESIGNS) in CBAM-ResNet-50, by hand."""
    return R50_OFFICIAL + sum(R50_DESIGNS[row][1](c) for c in R50_GATE_CHANNELS)


@pytest.mark.parametrize("row", [row for row in R50_DESIGNS if row != "cbam"])  # cbam: tests/test_resnet.py
def test_parameter_counts_by_hand(row):
    options, _ = R50_DESIGNS[row]
    assert count_params(create_model("cbam_resnet50", **options), (1, 64, 64, 3)) == r50_parameters(row)


def test_layer_parameter_counts_by_hand():
    def count(layer):
        return count_params(layer, (1, 8, 8, 64))

    assert count(SpatialGate()) == 7 * 7 * 2 + 2
    assert count(SpatialGate(descriptor="conv1x1")) == 64 + 7 * 7 + 2
    assert count(SpatialGate(descriptor="conv1x1", kernel_size=3, use_bn=False)) == 64 + 3 * 3
    mlp = 64 * 4 + 4 + 4 * 64 + 64
    assert count(CBAM(reduction=16, spatial_descriptor="conv1x1", arrangement="parallel")) == mlp + 64 + 7 * 7 + 2


# ----------------------------------------------------------------------------- defaults unchanged
#
# Frozen copies of ChannelGate, SpatialGate and CBAM as they were before the design-space options
# (commit b6b479b), kept only to prove that the default options compute exactly what they did.
# Their constants are written out here, not imported from the modules they check.

# PyTorch's default nn.Linear/nn.Conv2d init, kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)).
_TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# kaiming_normal_(mode='fan_out', nonlinearity='relu'): N(0, 2 / fan_out).
_KAIMING_FAN_OUT_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The channel gate pools over positions (B, H, W, C) -> (B, C); the spatial gate over channels.
_POSITION_POOLS = {"avg": lambda x: jnp.mean(x, axis=(1, 2)), "max": lambda x: jnp.max(x, axis=(1, 2))}
_CHANNEL_POOLS = {"max": lambda x: jnp.max(x, axis=-1), "mean": lambda x: jnp.mean(x, axis=-1)}
_POOL_ORDERS = {"max_mean": ("max", "mean"), "mean_max": ("mean", "max")}


def _float32_at_least(x):
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class _ChannelGateBefore(nn.Module):
    reduction: int = 16
    pool_types: tuple = ("avg", "max")
    mlp_bias: bool = True
    dtype: object = None
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden = x.shape[-1] // self.reduction
        pooled = _float32_at_least(x)
        descriptors = jnp.stack([_POSITION_POOLS[p](pooled) for p in self.pool_types])
        dense = lambda n, name: nn.Dense(n, use_bias=self.mlp_bias, kernel_init=_TORCH_DEFAULT_INIT,  # noqa: E731
                                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        logits = dense(x.shape[-1], "fc2")(nn.relu(dense(hidden, "fc1")(descriptors))).sum(axis=0)
        scale = jax.nn.sigmoid(_float32_at_least(logits))
        self.sow("intermediates", "channel_attention", scale)
        return x * scale[:, None, None, :].astype(x.dtype)


class _SpatialGateBefore(nn.Module):
    kernel_size: int = 7
    pool_order: str = "max_mean"
    use_bn: bool = True
    bn_momentum: float = 0.99
    bn_zero_init: bool = True
    dtype: object = None
    param_dtype: object = jnp.float32
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x, train=False):
        pooled = _float32_at_least(x)
        compressed = jnp.stack([_CHANNEL_POOLS[p](pooled) for p in _POOL_ORDERS[self.pool_order]], axis=-1)
        pad = self.kernel_size // 2
        cpu_path = cpu_ops.use_cpu_path(self.implementation)
        y = nn.Conv(1, (self.kernel_size, self.kernel_size), padding=((pad, pad), (pad, pad)),
                    use_bias=False, kernel_init=_KAIMING_FAN_OUT_INIT,
                    conv_general_dilated=cpu_ops.conv_general_dilated if cpu_path else None,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(compressed)
        if self.use_bn:
            norm_cls = cpu_ops.BatchNorm if cpu_path else nn.BatchNorm
            y = norm_cls(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                         use_fast_variance=False,
                         scale_init=nn.initializers.zeros if self.bn_zero_init else nn.initializers.ones,
                         dtype=jnp.float32, param_dtype=self.param_dtype, name="bn")(y)
        scale = jax.nn.sigmoid(_float32_at_least(y))[..., 0]
        self.sow("intermediates", "spatial_attention", scale)
        return x * scale[..., None].astype(x.dtype)


class _CBAMBefore(nn.Module):
    channel_options: dict
    spatial_options: dict

    @nn.compact
    def __call__(self, x, train=False):
        x = _ChannelGateBefore(**self.channel_options, name="channel")(x)
        return _SpatialGateBefore(**self.spatial_options, name="spatial")(x, train=train)


@pytest.mark.parametrize("variant, extra", [
    ("official", {}), ("timm", {}), ("common", {}),
    ("official", {"implementation": "xla"}), ("official", {"dtype": jnp.bfloat16}), ("common", {"dtype": jnp.bfloat16}),
    ("timm", {"kernel_size": 3, "pool_types": ("max",)}),
])
def test_default_options_compute_what_they_did_before(rng, variant, extra, monkeypatch):
    from cbam_jax.registry import VARIANTS

    # Bit for bit against the old formulation, which is XLA's: the native gate kernels of the CPU
    # path sum in another order (their equality within rounding: tests/test_cpu_ops.py).
    monkeypatch.setattr(native, "ENABLED", False)

    options = {**VARIANTS[variant]["cbam"], "reduction": 4, **extra}
    channel_keys = {"reduction", "pool_types", "mlp_bias", "dtype"}
    renamed = {"spatial_use_bn": "use_bn", "spatial_bn_momentum": "bn_momentum", "spatial_bn_zero_init": "bn_zero_init"}
    before = _CBAMBefore({k: v for k, v in options.items() if k in channel_keys},
                         {renamed.get(k, k): v for k, v in options.items() if k not in channel_keys - {"dtype"}})
    now = CBAM(**options)
    x = jnp.asarray(rng.normal(size=SHAPE), options.get("dtype", jnp.float32))

    variables_before = before.init(jax.random.key(7), x)
    variables_now = now.init(jax.random.key(7), x)
    flat_before = traverse_util.flatten_dict(variables_before)
    flat_now = traverse_util.flatten_dict(variables_now)
    assert flat_now.keys() == flat_before.keys()
    for key in flat_before:  # the same parameter tree, initialised to the same values
        np.testing.assert_array_equal(flat_now[key], flat_before[key], err_msg=str(key))

    variables = randomize(variables_now, seed=3)
    for train in (False, True):
        out_before, state_before = before.apply(variables, x, train=train, mutable=["batch_stats", "intermediates"])
        out_now, state_now = now.apply(variables, x, train=train, mutable=["batch_stats", "intermediates"])
        np.testing.assert_array_equal(out_now, out_before)
        jax.tree.map(np.testing.assert_array_equal, state_now, state_before)

    def grads(model):
        return jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, x, train=True,
                                                      mutable=["batch_stats"])[0].astype(jnp.float32).sum()))(
            variables["params"])

    jax.tree.map(np.testing.assert_array_equal, grads(now), grads(before))


def test_default_options_keep_the_channel_and_spatial_gates_unchanged(rng, monkeypatch):
    monkeypatch.setattr(native, "ENABLED", False)  # bit for bit: XLA's formulation, as above
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    pairs = [(ChannelGate(reduction=4), _ChannelGateBefore(reduction=4)), (SpatialGate(), _SpatialGateBefore())]
    for now, before in pairs:
        variables = randomize(now.init(jax.random.key(0), x), seed=2)
        assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, before.init(jax.random.key(0), x))
        np.testing.assert_array_equal(now.apply(variables, x), before.apply(variables, x))


@pytest.mark.parametrize("path, fan_out, fan_in, std, kurtosis", [
    # kaiming_normal_(mode='fan_out', nonlinearity='relu'), the ResNet convolutions: N(0, 2 / fan_out)
    (("conv1", "kernel"), 7 * 7 * 64, 7 * 7 * 3, (2 / (7 * 7 * 64)) ** 0.5, 3.0),
    (("layer1_0", "conv3", "kernel"), 256, 64, (2 / 256) ** 0.5, 3.0),
    # the downsample convolution keeps PyTorch's default, U(+-1/sqrt(fan_in)) (the official code)
    (("layer1_0", "downsample_conv", "kernel"), 256, 64, (1 / (3 * 64)) ** 0.5, 1.8),
])
def test_resnet_convolution_initialisers(path, fan_out, fan_in, std, kurtosis):
    """The std of large kernels within 3 % (their sampling error is < 0.8 %) and the shape of the
    distribution by its kurtosis (normal 3, uniform 1.8, a normal truncated at 2 std ~2.4): fan-in
    instead of fan-out is 50-400 % off, PyTorch's default for the kaiming one 18-66 % off."""
    model = ResNet(stage_sizes=(1,), block="bottleneck", num_classes=0, stem="imagenet", width=64)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = np.asarray(traverse_util.flatten_dict(params)[path], np.float64)
    assert int(np.prod(kernel.shape[:-1])) == fan_in and kernel.size // kernel.shape[-2] == fan_out
    assert kernel.std() == pytest.approx(std, rel=0.03)
    assert abs(kernel.mean()) < 0.03 * std
    assert np.mean((kernel - kernel.mean()) ** 4) / kernel.var() ** 2 == pytest.approx(kurtosis, abs=0.2)
