"""The Wide ResNets, ResNeXts and MobileNets: the paper's parameter counts, the upstream packages'
exact counts, the registry's names, shapes, feature maps and configuration errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import ResNet, create_model, list_models
from cbam_jax.errors import InvalidInput
from cbam_jax.mobilenet import MobileNet, mobilenet_channels
from cbam_jax.registry import model_config, model_from_config, parse_name, split_name
from tests.helpers import random_variables
from tests.test_resnet import count_params

# The CBAM paper's Table 4 / Table 5 parameters in M, as printed (rounded to 0.01 M), for the rows
# of issue 21 (official variant: MLPs with biases). MobileNet alpha 0.7 + SE is left out: the paper
# prints 2.71 M, the definitions give 2.70 M (2,704,594), and the row is not confirmed in a source.
PAPER_PARAMS_M = {
    "wide_resnet18_1_5": 25.88, "se_wide_resnet18_1_5": 26.07, "cbam_wide_resnet18_1_5": 26.08,
    "wide_resnet18_2": 45.62, "se_wide_resnet18_2": 45.97, "cbam_wide_resnet18_2": 45.97,
    "resnext50_32x4d": 25.03, "se_resnext50_32x4d": 27.56, "cbam_resnext50_32x4d": 27.56,
    "resnext101_32x4d": 44.18, "se_resnext101_32x4d": 48.96, "cbam_resnext101_32x4d": 48.96,
    "mobilenet_w1": 4.23, "se_mobilenet_w1": 5.07, "cbam_mobilenet_w1": 5.07,
    "mobilenet_w7d10": 2.30, "cbam_mobilenet_w7d10": 2.71,
}
# Models with published weights: the upstream constructor for `torch_count`.
TORCHVISION = ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
PYTORCHCV = {"resnext50_32x4d": "resnext50_32x4d", "resnext101_32x4d": "resnext101_32x4d",
             "se_resnext50_32x4d": "seresnext50_32x4d", "se_resnext101_32x4d": "seresnext101_32x4d",
             "mobilenet_w1": "mobilenet_w1", "mobilenet_w3d4": "mobilenet_w3d4", "mobilenet_wd2": "mobilenet_wd2",
             "mobilenet_wd4": "mobilenet_wd4"}


def big_is_slow(name: str, *values):
    """A parametrize case, slow for the 101-layer and doubled-width models (seconds to trace)."""
    slow = "101" in name or name.startswith(("wide_resnet50", "se_wide_resnet50", "cbam_wide_resnet50"))
    return pytest.param(name, *values, marks=pytest.mark.slow if slow else ())


def torch_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, expected", [big_is_slow(n, m) for n, m in PAPER_PARAMS_M.items()])
def test_parameter_counts_match_the_paper(name, expected):
    assert round(count_params(create_model(name)) / 1e6, 2) == expected


def test_resnext50_has_torchvisions_exact_count():
    assert count_params(create_model("resnext50_32x4d")) == 25_028_904  # torchvision's documented count


@pytest.mark.parametrize("name", [big_is_slow(n) for n in TORCHVISION])
def test_parameter_counts_equal_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    assert count_params(create_model(name)) == torch_count(getattr(torchvision.models, name)())


@pytest.mark.parametrize("name, upstream", [big_is_slow(n, u) for n, u in PYTORCHCV.items()])
def test_parameter_counts_equal_pytorchcv(name, upstream):
    provider = pytest.importorskip("pytorchcv.model_provider")
    assert count_params(create_model(name)) == torch_count(provider.get_model(upstream))


def test_registry_names():
    names = set(list_models())
    assert {"cbam_resnext50_32x4d", "se_wide_resnet50_2", "bam_resnext101_32x4d", "cbam_wide_resnet18_1_5",
            "cbam_mobilenet_w1", "se_mobilenet_w7d10", "mobilenet_wd4", "resnext101_64x4d"} <= names
    assert len(names) == 20 + 4 * 8 + 3 * 5  # ResNets, 8 other ResNet-family architectures, 5 MobileNets
    assert "bam_mobilenet_w1" not in names  # BAM has no defined place in a MobileNet
    assert list_models("*mobilenet_w1") == ["cbam_mobilenet_w1", "mobilenet_w1", "se_mobilenet_w1"]
    assert split_name("cbam_resnext50_32x4d") == ("cbam", "resnext50_32x4d")
    assert parse_name("se_resnet50") == ("se", 50) and parse_name("mobilenet_w1") == (None, "mobilenet_w1")
    for bad in ("bam_mobilenet_w1", "resnext50", "cbam_", "cbam_cbam_resnet18", "xresnet18"):
        with pytest.raises(InvalidInput, match="Unknown model name"):
            create_model(bad)


def test_architectures_are_options_of_one_module():
    resnext = create_model("cbam_resnext50_32x4d")
    assert type(resnext) is ResNet and (resnext.groups, resnext.base_width) == (32, 4)
    assert create_model("wide_resnet50_2").base_width == 128
    wrn = create_model("wide_resnet18_1_5")
    assert wrn.block == "basic" and wrn.stage_widths == (96, 192, 384, 768) and wrn.width == 64
    assert create_model("wide_resnet18_2", width=8).stage_widths == (16, 32, 64, 128)  # widened with the width
    assert isinstance(create_model("mobilenet_w7d10"), MobileNet)
    assert mobilenet_channels(0.7)[0] == (22,) and mobilenet_channels(0.7)[-1] == (716, 716)


def _tiny(name, **overrides):
    """A registered architecture at a test width (stem 8 or 16 channels)."""
    if split_name(name)[0] is not None:
        overrides.setdefault("reduction", 4)
    return create_model(name, num_classes=5, width=16 if "resnext" in name else 8, **overrides)


SMALL = ["cbam_resnext50_32x4d", "se_wide_resnet50_2", "bam_resnext50_32x4d", "cbam_wide_resnet18_1_5",
         "cbam_mobilenet_w1", "se_mobilenet_w3d4", "mobilenet_wd2"]


@pytest.mark.parametrize("name", SMALL)
def test_small_models_give_logits_and_round_trip_their_config(name):
    model = _tiny(name)
    x = jnp.zeros((2, 32, 40, 3))
    logits, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert model_from_config(model_config(model)) == model
    if "resnext" in name:  # the grouped conv: (3, 3, Cin / groups, Cout) kernels
        assert variables["params"]["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 1, 32)
    if "mobilenet" in name:  # the depthwise conv: one input channel per group
        assert variables["params"]["stage2_0"]["dw_conv"]["kernel"].shape[2] == 1


@pytest.mark.parametrize("name, channels, reductions", [
    ("cbam_resnext50_32x4d", (64, 128, 256, 512), (4, 8, 16, 32)),
    ("cbam_wide_resnet18_1_5", (12, 24, 48, 96), (4, 8, 16, 32)),
    ("cbam_mobilenet_w1", (16, 32, 64, 128, 256), (2, 4, 8, 16, 32)),
])
def test_features_only_matches_feature_info(name, channels, reductions):
    model = _tiny(name, features_only=True)
    x = jnp.zeros((1, 64, 64, 3))
    features, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    info = model.feature_info
    assert tuple(i.channels for i in info) == channels and tuple(i.reduction for i in info) == reductions
    assert [f.shape for f in features] == [(1, 64 // r, 64 // r, c) for c, r in zip(channels, reductions)]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_w1"])
def test_out_indices_as_an_integer_means_the_last_levels(name):
    levels = 5 if name == "resnet18" else 6
    assert create_model(name, features_only=True, out_indices=3).out_indices == tuple(range(levels - 3, levels))
    assert create_model(name, features_only=True, out_indices=np.int64(1)).out_indices == (levels - 1,)
    numpy_indices = create_model(name, features_only=True, out_indices=np.array([0, 2])).out_indices
    assert numpy_indices == (0, 2) and all(type(i) is int for i in numpy_indices)
    hash(create_model(name, features_only=True, out_indices=np.array([1, 2])))  # still a valid jit static argument
    with pytest.raises(ValueError, match="last 7 of"):
        create_model(name, features_only=True, out_indices=levels + 1 if name == "mobilenet_w1" else 7)


def _deep_is_slow(name: str):
    """A parametrize case for `test_every_registered_model_builds`: fast for the MobileNets (where the
    attention meets the fewest channels), slow for the rest (about 0.1-1.6 s each to trace)."""
    return pytest.param(name, marks=() if "mobilenet" in name else pytest.mark.slow)


@pytest.mark.parametrize("name", [_deep_is_slow(n) for n in list_models()])
def test_every_registered_model_builds_at_its_defaults(name):
    """Every name at its published width and the default reduction 16 traces init and forward at a tiny
    input: 8-channel layers (MobileNet-0.25's first unit) keep one hidden unit in their gate's MLP."""
    model = create_model(name)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    logits, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    assert logits.shape == (1, 1000) and logits.dtype == jnp.float32
    if name == "cbam_mobilenet_wd4":  # int(32 * 0.25) = 8 channels, 8 // 16 = 0 hidden units, raised to 1
        assert variables["params"]["stage1_0"]["dw_attention"]["channel"]["fc1"]["kernel"].shape == (8, 1)


@pytest.mark.slow  # compiles two 13-unit MobileNets
@pytest.mark.parametrize("name", ["cbam_mobilenet_wd4", "se_mobilenet_wd4"])
def test_quarter_width_mobilenets_run_at_the_default_reduction(name):
    model = create_model(name, num_classes=10)
    variables = random_variables(model, (2, 32, 32, 3))
    logits = jax.jit(model.apply)(variables, jax.random.normal(jax.random.key(0), (2, 32, 32, 3)))
    assert logits.shape == (2, 10) and bool(jnp.all(jnp.isfinite(logits))) and float(jnp.std(logits)) > 0


@pytest.mark.parametrize("make, message", [
    (lambda: ResNet((2, 2), block="basic", groups=2), "basic blocks have no grouped"),
    (lambda: ResNet((2, 2), base_width=0), "base_width must be a positive integer"),
    (lambda: ResNet((2, 2), stage_widths=(8,)), "one positive width per stage"),
    (lambda: ResNet((2, 2), width=8, groups=32, base_width=4), "use a width >= 16"),
    (lambda: MobileNet(attention="bam"), "BAM has no defined place"),
    (lambda: MobileNet(width_multiplier=0.001), "at least one channel"),
    (lambda: MobileNet(stem="deep"), "unknown stem"),
    (lambda: create_model("mobilenet_w1", groups=2), "Unknown option"),
    (lambda: create_model("resnext50_32x4d", groups=2), "Unknown option"),  # the name fixes the cardinality
])
def test_bad_configuration_is_a_clear_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("in_channels, groups, strides", [(32, 32, 2), (64, 32, 1), (16, 16, 1)])
def test_cpu_path_conv_hands_grouped_and_depthwise_convs_to_xla(in_channels, groups, strides):
    """Grouped (ResNeXt) and depthwise (MobileNet) convs on the CPU path equal lax's, values and
    gradients: the oneDNN kernels take one group only, so these fall back to XLA's convolution."""
    from jax import lax

    from cbam_jax.layers import cpu_ops

    x = jax.random.normal(jax.random.key(0), (2, 9, 9, in_channels))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, in_channels // groups, in_channels))
    numbers = ("NHWC", "HWIO", "NHWC")

    def loss(conv, x, kernel):
        y = conv(x, kernel, (strides, strides), ((1, 1), (1, 1)), dimension_numbers=numbers, feature_group_count=groups)
        return jnp.sum(jnp.sin(y)), y

    (_, fast), fast_grads = jax.jit(jax.value_and_grad(lambda *a: loss(cpu_ops.conv_general_dilated, *a),
                                                       argnums=(0, 1), has_aux=True))(x, kernel)
    (_, ref), ref_grads = jax.jit(jax.value_and_grad(lambda *a: loss(lax.conv_general_dilated, *a),
                                                     argnums=(0, 1), has_aux=True))(x, kernel)
    np.testing.assert_allclose(fast, ref, rtol=1e-6, atol=1e-6)
    for g_fast, g_ref in zip(fast_grads, ref_grads):
        np.testing.assert_allclose(g_fast, g_ref, rtol=1e-5, atol=1e-5)


def test_converted_weights_do_not_share_memory_with_the_torch_model():
    """from_torch(model.state_dict()) copies: training the torch model afterwards (as the parity tests
    do) must not change the JAX arrays. (They were views of the torch tensors' memory.)"""
    torch = pytest.importorskip("torch")
    from cbam_jax.convert import from_torch, to_torch

    model = _tiny("mobilenet_wd4")
    variables = random_variables(model, (1, 32, 32, 3))
    state = {k: v.clone() for k, v in to_torch(variables, arch=model).items()}
    _, converted = from_torch(state)
    before = np.array(converted["params"]["fc"]["bias"])
    with torch.no_grad():
        state["output.bias"].add_(1.0)
    np.testing.assert_array_equal(np.asarray(converted["params"]["fc"]["bias"]), before)


def _docs_table() -> str:
    text = open(__file__.replace("tests/test_families.py", "docs/models.md")).read()
    return text.split("<!-- models-table:begin -->\n")[1].split("\n<!-- models-table:end -->")[0].strip()


def test_summary_counts_macs_in_both_conventions():
    from cbam_jax import summary

    total = summary("resnet50").total
    assert total.params == 25_557_032
    assert round(total.macs / 1e9, 3) == 4.089 and round(total.paper_macs / 1e9, 3) == 3.858
    cbam = summary("cbam_resnet18")
    assert cbam.total.params == 11_779_392 and round(cbam.total.paper_macs / 1e9, 3) == 1.815
    assert [row.part for row in cbam.rows] == ["stem", "stage 1", "stage 2", "stage 3", "stage 4", "head"]
    assert sum(row.attention_params for row in cbam.rows) == 11_779_392 - 11_689_512
    assert "attention: 0.76% of the parameters" in cbam.format()
    # Only the bottleneck's stride moves: basic blocks and MobileNets count the same in both conventions.
    mobilenet = summary("se_mobilenet_w1").total
    assert mobilenet.macs == mobilenet.paper_macs and round(mobilenet.macs / 1e9, 3) == 0.570


def test_docs_model_table_rows_are_what_summary_computes():
    from cbam_jax.summary import models_table

    rows = _docs_table().splitlines()
    fresh = models_table(["resnet50", "cbam_resnext50_32x4d", "cbam_mobilenet_w1"]).splitlines()
    assert fresh[:2] == rows[:2]
    for line in fresh[2:]:
        assert line in rows


@pytest.mark.slow  # every row of the paper's Table 4 and 5 (ResNet-101s included): about 3 minutes
def test_docs_model_table_is_what_summary_computes():
    from cbam_jax.summary import models_table

    assert _docs_table() == models_table()


def test_summary_command(capsys):
    from cbam_jax.cli import main

    assert main(["summary", "cbam_resnet18", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("cbam_resnet18 at 64x64") and "total" in out
    assert main(["summary", "cbam_resnet7"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Unknown model name 'cbam_resnet7'" in err
