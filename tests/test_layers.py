"""The attention layers against NumPy versions of the paper's / official code's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.helpers import randomize, to_numpy

from tests import numpy_reference as ref
from cbam_jax import BAM, CBAM, SE, ChannelGate, SpatialGate
from cbam_jax.layers.common import max_over

# Non-square on purpose: catches H/W mix-ups in pooling and padding.
SHAPE = (3, 5, 7, 32)
TOL = dict(rtol=1e-5, atol=1e-5)


def _setup(layer, x, seed=1):
    variables = randomize(jax.eval_shape(layer.init, jax.random.key(0), jnp.asarray(x)), seed)
    return variables, to_numpy(variables)


@pytest.mark.parametrize("pool_types", [("avg",), ("max",), ("lp",), ("lse",), ("avg", "max"), ("avg", "max", "lp", "lse")])
@pytest.mark.parametrize("mlp_bias", [True, False])
def test_channel_gate_matches_formula(rng, pool_types, mlp_bias):
    x = rng.normal(size=SHAPE).astype(np.float32)
    layer = ChannelGate(reduction=4, pool_types=pool_types, mlp_bias=mlp_bias)
    variables, p = _setup(layer, x)
    out = layer.apply(variables, x)
    fc1, fc2 = p["params"]["fc1"], p["params"]["fc2"]
    assert fc1["kernel"].shape == (32, 8) and ("bias" in fc1) == mlp_bias
    expected = ref.channel_gate(x.astype(np.float64), fc1["kernel"], fc2["kernel"], fc1.get("bias"), fc2.get("bias"),
                                pool_types=pool_types)
    np.testing.assert_allclose(out, expected, **TOL)


@pytest.mark.parametrize("pool_order", ["max_mean", "mean_max"])
@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kernel_size", [7, 3])
def test_spatial_gate_matches_formula(rng, pool_order, use_bn, train, kernel_size):
    x = rng.normal(size=SHAPE).astype(np.float32)
    layer = SpatialGate(kernel_size=kernel_size, pool_order=pool_order, use_bn=use_bn)
    variables, p = _setup(layer, x)
    out, updates = layer.apply(variables, x, train=train, mutable=["batch_stats"])
    assert p["params"]["conv"]["kernel"].shape == (kernel_size, kernel_size, 2, 1)
    assert ("bn" in p["params"]) == use_bn
    bn = None
    if use_bn:
        bn = (p["params"]["bn"]["scale"], p["params"]["bn"]["bias"], p["batch_stats"]["bn"]["mean"], p["batch_stats"]["bn"]["var"])
    expected = ref.spatial_gate(x.astype(np.float64), p["params"]["conv"]["kernel"], pool_order, bn, train=train)
    np.testing.assert_allclose(out, expected, **TOL)
    if use_bn and train:  # running statistics move with Flax momentum 0.99 (PyTorch 0.01), official default
        conv_out = ref.conv2d(np.stack([x.max(-1), x.mean(-1)] if pool_order == "max_mean" else [x.mean(-1), x.max(-1)], -1),
                              p["params"]["conv"]["kernel"], padding=kernel_size // 2)
        expected_mean = 0.99 * p["batch_stats"]["bn"]["mean"] + 0.01 * conv_out.mean(axis=(0, 1, 2))
        np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"], expected_mean, **TOL)


def test_pool_order_matters(rng):
    """Loading official (max, mean) weights with the paper's (mean, max) order must change the output."""
    x = rng.normal(size=SHAPE).astype(np.float32)
    official = SpatialGate(pool_order="max_mean", use_bn=False)
    variables = randomize(jax.eval_shape(official.init, jax.random.key(0), x))
    paper = SpatialGate(pool_order="mean_max", use_bn=False)
    assert np.abs(official.apply(variables, x) - paper.apply(variables, x)).max() > 1e-3
    flipped = jax.tree.map(lambda k: k[:, :, ::-1, :], variables)  # swap the conv's input channels
    np.testing.assert_allclose(official.apply(variables, x), paper.apply(flipped, x), **TOL)


@pytest.mark.parametrize("use_spatial", [True, False])
def test_cbam_is_channel_then_spatial(rng, use_spatial):
    x = rng.normal(size=SHAPE).astype(np.float32)
    layer = CBAM(reduction=4, use_spatial=use_spatial)
    variables, p = _setup(layer, x)
    out = layer.apply(variables, x)
    fc1, fc2 = p["params"]["channel"]["fc1"], p["params"]["channel"]["fc2"]
    expected = ref.channel_gate(x.astype(np.float64), fc1["kernel"], fc2["kernel"], fc1["bias"], fc2["bias"])
    if use_spatial:
        bn = (p["params"]["spatial"]["bn"]["scale"], p["params"]["spatial"]["bn"]["bias"],
              p["batch_stats"]["spatial"]["bn"]["mean"], p["batch_stats"]["spatial"]["bn"]["var"])
        expected = ref.spatial_gate(expected, p["params"]["spatial"]["conv"]["kernel"], "max_mean", bn)
    else:
        assert "spatial" not in p["params"]
    np.testing.assert_allclose(out, expected, **TOL)


def test_se_is_avg_pool_channel_gate(rng):
    x = rng.normal(size=SHAPE).astype(np.float32)
    variables, p = _setup(SE(reduction=4), x)
    fc1, fc2 = p["params"]["fc1"], p["params"]["fc2"]
    expected = ref.channel_gate(x.astype(np.float64), fc1["kernel"], fc2["kernel"], fc1["bias"], fc2["bias"], ("avg",))
    np.testing.assert_allclose(SE(reduction=4).apply(variables, x), expected, **TOL)


@pytest.mark.parametrize("combine", ["product", "sum"])
def test_bam_matches_official_formula(rng, combine):
    x = rng.normal(size=(2, 9, 11, 32)).astype(np.float32)  # non-square: the official code assumes H == W
    layer = BAM(reduction=4, combine=combine)
    variables, p = _setup(layer, x)
    merged = {name: {**p["params"][name], **p["batch_stats"].get(name, {})} for name in p["params"]}
    np.testing.assert_allclose(layer.apply(variables, x), ref.bam(x.astype(np.float64), merged, combine), **TOL)


def test_official_initialisation():
    x = jnp.ones((2, 8, 8, 32))
    variables = CBAM(reduction=4).init(jax.random.key(0), x)
    # Official: the spatial BN scale starts at 0, so the spatial gate is 0.5 everywhere.
    assert float(jnp.abs(variables["params"]["spatial"]["bn"]["scale"]).max()) == 0.0
    assert float(jnp.abs(variables["params"]["channel"]["fc1"]["bias"]).max()) == 0.0
    _, state = CBAM(reduction=4).apply(variables, x, mutable=["intermediates"])
    np.testing.assert_allclose(state["intermediates"]["spatial"]["spatial_attention"][0], 0.5)
    timm_like = CBAM(reduction=4, spatial_bn_zero_init=False).init(jax.random.key(0), x)
    assert float(timm_like["params"]["spatial"]["bn"]["scale"][0]) == 1.0


@pytest.mark.parametrize("layer, names", [
    (CBAM(reduction=4), {("channel", "channel_attention"): (3, 32), ("spatial", "spatial_attention"): (3, 5, 7)}),
    (BAM(reduction=4), {("channel_attention",): (3, 32), ("spatial_attention",): (3, 5, 7)}),
    (SE(reduction=4), {("channel_attention",): (3, 32)}),
])
def test_sown_attention_maps(rng, layer, names):
    x = rng.normal(size=SHAPE).astype(np.float32)
    variables = randomize(jax.eval_shape(layer.init, jax.random.key(0), x))
    _, state = layer.apply(variables, x, mutable=["intermediates"])
    for path, shape in names.items():
        node = state["intermediates"]
        for key in path:
            node = node[key]
        (value,) = node
        assert value.shape == shape
        assert float(value.min()) > 0.0 and float(value.max()) < 1.0


def test_numpy_integers_are_valid_sizes():
    x = jnp.zeros((1, 8, 8, 16))
    variables = jax.eval_shape(SpatialGate(kernel_size=np.int64(3)).init, jax.random.key(0), x)
    assert variables["params"]["conv"]["kernel"].shape == (3, 3, 2, 1)
    variables = jax.eval_shape(ChannelGate(reduction=np.int32(4)).init, jax.random.key(0), x)
    assert variables["params"]["fc1"]["kernel"].shape == (16, 4)


@pytest.mark.parametrize("layer, channels, hidden", [
    (ChannelGate(reduction=16), 32, 2), (ChannelGate(reduction=16), 44, 2),  # floored, as the official code
    (ChannelGate(reduction=64), 32, 1), (SE(reduction=16), 8, 1), (BAM(), 8, 1),  # at least one unit, as timm
])
def test_hidden_width_is_channels_over_reduction_but_at_least_one(layer, channels, hidden):
    params = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((2, 8, 8, channels)))["params"]
    first = params["channel_fc1"] if isinstance(layer, BAM) else params["fc1"]
    assert first["kernel"].shape == (channels, hidden)


@pytest.mark.parametrize("layer, shape, message", [
    (ChannelGate(reduction=0), (2, 4, 4, 32), "reduction must be a positive integer"),
    (ChannelGate(), (4, 4, 32), "NHWC"),
    (ChannelGate(reduction=4.0), (2, 4, 4, 32), "reduction must be a positive integer"),
    (ChannelGate(pool_types=("avg", "median")), (2, 4, 4, 32), "unknown pool type"),
    (ChannelGate(pool_types="avg"), (2, 4, 4, 32), "non-empty sequence"),
    (SpatialGate(kernel_size=4), (2, 8, 8, 4), "kernel_size must be an odd"),
    (SpatialGate(pool_order="avg_max"), (2, 8, 8, 4), "pool_order must be one of"),
    (SpatialGate(), (2, 8, 8, 4, 1), "NHWC"),
    (CBAM(kernel_size=0), (2, 8, 8, 32), "kernel_size"),
    (BAM(combine="mean"), (2, 8, 8, 32), "combine must be one of"),
    (BAM(reduction=-2), (2, 8, 8, 8), "reduction must be a positive integer"),
])
def test_bad_input_is_a_clear_value_error(layer, shape, message):
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize("axes", [(1, 2), (3,), -1])
def test_max_over_gradient_goes_to_the_first_maximum(axes):
    """Ties everywhere (small integers): the gradient reaches only the first maximum in row-major
    order over the reduced axes, as PyTorch's max pools and torch.max; under jit with a fused
    producer, where jnp.max's equality-mask gradient once went wrong."""
    x = np.random.default_rng(0).integers(0, 3, (2, 4, 5, 3)).astype(np.float32)
    reduced = tuple(sorted(a % 4 for a in ((axes,) if isinstance(axes, int) else axes)))
    weights = np.random.default_rng(1).standard_normal([s for i, s in enumerate(x.shape) if i not in reduced])
    value, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(max_over(x * 1.0 + 0.0, axes) * weights)))(x)

    moved = np.moveaxis(x, reduced, range(4 - len(reduced), 4))
    flat = moved.reshape(moved.shape[:4 - len(reduced)] + (-1,))
    first = np.argmax(flat, axis=-1)  # NumPy's argmax returns the first maximum
    expected = np.zeros_like(flat)
    np.put_along_axis(expected, first[..., None], weights[..., None], axis=-1)
    expected = np.moveaxis(expected.reshape(moved.shape), range(4 - len(reduced), 4), reduced)
    np.testing.assert_allclose(value, np.sum(flat.max(-1) * weights), rtol=1e-5)  # float32 sum, any order
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


def test_max_over_rejects_axes_that_are_not_adjacent():
    with pytest.raises(ValueError, match="adjacent axes"):
        max_over(jnp.zeros((2, 3, 4, 5)), (1, 3))
