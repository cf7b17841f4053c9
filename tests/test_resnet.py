"""The ResNet family and the registry: counts, shapes, gradients, precision, sown maps, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import ResNet, create_model, list_models
from cbam_jax.registry import model_config, model_from_config
from tests.helpers import randomize

# Official / paper counts (1000 classes, official variant).
PARAM_COUNTS = {
    "cbam_resnet18": 11_779_392,
    "cbam_resnet34": 21_960_468,
    "cbam_resnet50": 28_089_624,
    "cbam_resnet101": 49_330_172,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "se_resnet50": 28_088_024,  # Hu et al.'s SE-ResNet-50
    "bam_resnet50": 25_915_099,  # BAM paper: 25.92M
}
# timm and the common variant drop the MLP biases (and the latter the spatial BatchNorm).
VARIANT_COUNTS = {("cbam_resnet50", "timm"): 28_073_576, ("cbam_resnet50", "common"): 28_073_544}


def count_params(model, shape=(1, 64, 64, 3)):
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def deep_is_slow(name: str, *values):
    """A parametrize case, marked slow for ResNet-101/152 (tracing a deep network takes seconds;
    the code paths are those of ResNet-50)."""
    deep = name.endswith(("101", "152"))
    return pytest.param(name, *values, marks=pytest.mark.slow if deep else ())


@pytest.mark.parametrize("name, expected", [deep_is_slow(name, count) for name, count in PARAM_COUNTS.items()])
def test_parameter_counts_match_the_paper(name, expected):
    assert count_params(create_model(name)) == expected


@pytest.mark.parametrize("name_variant, expected", VARIANT_COUNTS.items())
def test_parameter_counts_of_other_variants(name_variant, expected):
    name, variant = name_variant
    assert count_params(create_model(name, variant=variant)) == expected


RESNET_NAMES = [name for name in list_models() if name.split("_")[-1].startswith("resnet")]


def test_registry_lists_every_depth_and_attention():
    names = RESNET_NAMES
    assert len(names) == 20
    assert {"resnet152", "se_resnet34", "cbam_resnet101", "bam_resnet18"} <= set(names)


@pytest.mark.parametrize("name", [deep_is_slow(name) for name in RESNET_NAMES])  # other families: test_families
@pytest.mark.parametrize("stem, size", [("imagenet", 64), ("cifar", 32)])
def test_output_shapes(name, stem, size):
    model = create_model(name, num_classes=7, stem=stem)
    x = jnp.zeros((2, size, size + 8, 3))  # non-square
    logits, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32


@pytest.mark.parametrize("name, features", [("cbam_resnet18", 512), ("bam_resnet50", 2048)])
def test_no_head_returns_pooled_features(name, features):
    model = create_model(name, num_classes=0, stem="cifar")
    out, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, features) and "fc" not in variables["params"]


def _small(attention, block="basic", **kw):
    """One block per stage, narrow: compiles in seconds, covers every code path of the family."""
    return ResNet(stage_sizes=(1, 1, 1, 1), block=block, attention=attention, num_classes=5, stem="cifar",
                  width=16, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("attention, block", [("cbam", "basic"), ("bam", "bottleneck"), ("se", "bottleneck")])
def test_jitted_forward_and_gradient_are_finite(attention, block):
    model = _small(attention, block)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jnp.arange(4) % 5
    variables = model.init(jax.random.key(1), x)

    @jax.jit
    def loss_and_grad(params, batch_stats):
        def loss_fn(params):
            logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, labels[:, None], axis=1).mean(), updates["batch_stats"]
        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    (loss, new_stats), grads = loss_and_grad(variables["params"], variables["batch_stats"])
    assert np.isfinite(float(loss))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    # Gradients reach the attention parameters and the batch statistics move.
    assert float(jnp.abs(grads["fc"]["kernel"]).sum()) > 0
    attention_grads = [g for path, g in jax.tree_util.tree_leaves_with_path(grads)
                        if any(getattr(k, "key", "").startswith(("attention", "bam")) for k in path)]
    assert attention_grads and any(float(jnp.abs(g).sum()) > 0 for g in attention_grads)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new_stats, variables["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 0


def test_eval_forward_is_deterministic_and_uses_running_stats():
    model = _small("cbam")
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = randomize(jax.eval_shape(model.init, jax.random.key(1), x))
    a = jax.jit(model.apply)(variables, x)
    b = jax.jit(model.apply)(variables, jnp.concatenate([x, 10 * x]))[:2]  # batch composition must not matter
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("attention, block", [("cbam", "bottleneck"), ("bam", "basic")])
def test_bfloat16_forward(attention, block):
    model = _small(attention, block, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables = model.init(jax.random.key(1), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))  # float32 params and stats
    logits, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
    assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates))
    float32_apply = jax.jit(_small(attention, block).apply)
    # Scale the head so that the float32 logits are O(1) (at init they can be ~0.03): an error bound
    # relative to their spread then means something, and all-zero logits cannot pass it.
    variables["params"]["fc"]["kernel"] /= float(jnp.std(float32_apply(variables, x)))
    reference = float32_apply(variables, x)
    scale = float(jnp.std(reference))
    assert 0.9 < scale < 1.1
    eval_logits = jax.jit(model.apply)(variables, x)
    # bfloat16 keeps 8 bits of mantissa: measured 1.3-1.7% of the logits' spread here.
    assert float(jnp.abs(eval_logits - reference).max()) < 0.05 * scale


@pytest.mark.slow
def test_sown_attention_maps_of_the_network():
    model = create_model("cbam_resnet50", num_classes=3, width=8)
    x = jax.random.normal(jax.random.key(0), (2, 64, 48, 3))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    _, state = jax.jit(lambda v: model.apply(v, x, mutable=["intermediates"]))(variables)
    maps = state["intermediates"]
    blocks = [k for k in maps if k.startswith("layer")]
    assert len(blocks) == 16
    # ImageNet stem: /4, then stages at /4, /8, /16, /32.
    for stage, (h, w, c) in enumerate([(16, 12, 32), (8, 6, 64), (4, 3, 128), (2, 2, 256)], start=1):
        (spatial,) = maps[f"layer{stage}_0"]["attention"]["spatial"]["spatial_attention"]
        (channel,) = maps[f"layer{stage}_0"]["attention"]["channel"]["channel_attention"]
        assert spatial.shape == (2, h, w) and channel.shape == (2, c)
        for m in (spatial, channel):
            assert 0.0 < float(m.min()) and float(m.max()) < 1.0


def test_variant_presets():
    official = create_model("cbam_resnet18")
    assert official.attention_options["pool_order"] == "max_mean" and official.attention_options["mlp_bias"]
    timm = create_model("cbam_resnet18", variant="timm")
    assert timm.attention_options["pool_order"] == "mean_max" and timm.zero_init_residual
    common = create_model("cbam_resnet18", variant="common", kernel_size=3)
    assert not common.attention_options["spatial_use_bn"] and common.attention_options["kernel_size"] == 3
    variables = jax.eval_shape(common.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert "bn" not in variables["params"]["layer1_0"]["attention"]["spatial"]


@pytest.mark.slow  # a real (eager) init: each initializer compiles for each parameter shape
def test_timm_variant_zero_inits_the_last_batch_norm_of_each_block():
    one_block = create_model("resnet18", variant="timm", width=8).clone(stage_sizes=(1,))  # the cheapest init
    zero_init = one_block.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert float(jnp.abs(zero_init["params"]["layer1_0"]["bn2"]["scale"]).max()) == 0.0


def test_list_options_keep_the_model_hashable():
    model = create_model("cbam_resnet18", pool_types=["avg", "max"])
    assert model.attention_options["pool_types"] == ("avg", "max")
    hash(model)  # a static jit argument must hash


def test_model_wide_batch_norm_options_reach_bam():
    model = ResNet(stage_sizes=(1, 1), block="basic", attention="bam", bn_momentum=0.5, width=16, stem="cifar")
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(1), x)
    # Random parameters; running statistics as Flax initialises them (mean 0, variance 1).
    variables = {"params": randomize(shapes["params"]), "batch_stats": jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.full(s.shape, 1.0 if path[-1].key == "var" else 0.0, s.dtype), shapes["batch_stats"])}
    train_step = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))
    _, updates = train_step(variables)
    before, after = variables["batch_stats"]["bam1"], updates["batch_stats"]["bam1"]
    # Running mean m' = momentum * m + (1 - momentum) * batch mean, with m = 0: check momentum 0.5
    # through a second step from the updated state.
    _, updates2 = train_step({"params": variables["params"], "batch_stats": updates["batch_stats"]})
    first = after["channel_bn"]["mean"]
    np.testing.assert_allclose(updates2["batch_stats"]["bam1"]["channel_bn"]["mean"], 0.5 * first + first, rtol=1e-5)
    assert float(jnp.abs(before["channel_bn"]["mean"]).max()) == 0.0


def test_model_config_round_trips_through_json():
    model = create_model("cbam_resnet34", num_classes=10, stem="cifar", variant="timm", dtype=jnp.bfloat16, reduction=8)
    rebuilt = model_from_config(json.loads(json.dumps(model_config(model))))
    assert rebuilt == model and hash(rebuilt) == hash(model)


@pytest.mark.parametrize("call, message", [
    (lambda: create_model("cbam_resnet42"), "Unknown model name 'cbam_resnet42'; available: bam_resnet101"),
    (lambda: create_model("vgg16"), "available:"),
    (lambda: create_model("cbam_resnet18", variant="keras"), "Unknown variant 'keras'; available: official, timm, common"),
    (lambda: create_model("bam_resnet50", variant="timm"), "only in the variant"),
    (lambda: create_model("cbam_resnet18", stem="tiny"), "unknown stem 'tiny'; allowed"),
    (lambda: create_model("cbam_resnet18", kernel_sise=3), "Unknown option.*kernel_sise.*kernel_size"),
    (lambda: create_model("resnet18", reduction=8), "Unknown option.*reduction"),
    (lambda: model_from_config({"stage_sizes": [2], "color": "red"}), "Unknown model config field"),
    (lambda: create_model("cbam_resnet018"), "Unknown model name"),
    (lambda: create_model("se_resnet18", variant="timm"), "only in the variant"),
    (lambda: create_model("cbam_resnet18", width=0), "width must be a positive integer"),
    (lambda: create_model("cbam_resnet18", num_classes=1.5), "num_classes must be an integer"),
    (lambda: ResNet(stage_sizes=("a",)), "stage_sizes must be positive block counts"),
    (lambda: ResNet(stage_sizes=(1, 1), attention="cbam", attention_options={"dtype": "bfloat16"}),
     "unknown attention_options.*set on the ResNet itself"),
])
def test_bad_configuration_is_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("name, overrides, shape, message", [
    ("cbam_resnet18", {"kernel_size": 4}, (1, 32, 32, 3), "kernel_size must be an odd"),
    ("cbam_resnet18", {"reduction": 0}, (1, 32, 32, 3), "reduction must be a positive integer"),
    ("cbam_resnet18", {}, (1, 3, 32, 32), "looks like NCHW"),
    ("cbam_resnet18", {}, (32, 32, 3), "NHWC"),
])
def test_bad_input_is_a_clear_value_error(name, overrides, shape, message):
    model = create_model(name, stem="cifar", **overrides)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def test_train_apply_on_an_empty_batch_is_an_error_not_nan_statistics():
    model = ResNet(stage_sizes=(1,), block="basic", attention="cbam", num_classes=3, stem="cifar", width=8,
                   attention_options={"reduction": 4})
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    with pytest.raises(ValueError, match="empty batch"):
        model.apply(variables, jnp.zeros((0, 8, 8, 3)), train=True, mutable=["batch_stats"])
    assert model.apply(variables, jnp.zeros((0, 8, 8, 3))).shape == (0, 3)  # eval on nothing is fine
