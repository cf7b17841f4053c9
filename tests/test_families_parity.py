"""The Wide ResNets, ResNeXts and MobileNets against the real upstream code in float32 on the CPU:
eval logits (torchvision, timm with attn_layer 'cbam' and 'se', pytorchcv), conversion both ways,
feature maps against timm's `features_only`, and training (loss, gradients, one or two SGD steps) per family.
"""

import copy
import functools

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # full or short models in both frameworks
torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
model_provider = pytest.importorskip("pytorchcv.model_provider")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from timm.layers import SEModule  # noqa: E402
from timm.models.resnet import BasicBlock as TimmBasicBlock  # noqa: E402
from timm.models.resnet import Bottleneck as TimmBottleneck  # noqa: E402
from timm.models.resnet import ResNet as TimmResNet  # noqa: E402

from cbam_jax import ResNet, create_model  # noqa: E402
from cbam_jax.convert import detect, from_torch, load_variables, read_state_dict, to_torch  # noqa: E402
from cbam_jax.convert.layouts import get_layout  # noqa: E402
from cbam_jax.registry import VARIANTS  # noqa: E402
from tests.test_convert_parity import GRAD_RTOL  # noqa: E402
from tests.torch_refs.harness import (  # noqa: E402
    assert_close_per_tensor,
    assert_matches_float64,
    batch,
    flax_running_stats,
    nhwc,
    prepare,
    train_flax,
    train_torch,
)

NUM_CLASSES = 10
LOGIT_RTOL = 1e-5  # of the logit scale (max |logit|)


def pytorchcv_model(name, **kwargs):
    """A pytorchcv model whose fixed AvgPool2d(7) head is made global, for inputs below 224."""
    model = model_provider.get_model(name, num_classes=NUM_CLASSES, **kwargs)
    model.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)
    return model


def timm_short(block, attn_layer=None, **kwargs):
    """A timm ResNet with one block per stage: every code path of the architecture at a float32-friendly depth."""
    block_args = {"attn_layer": attn_layer} if attn_layer else None
    return TimmResNet(block=block, layers=[1, 1, 1, 1], num_classes=NUM_CLASSES, block_args=block_args, **kwargs)


# timm's SE rounds its hidden width to a multiple of 8; cbam-jax's is C // 16 (equal at standard widths).
se_unrounded = functools.partial(SEModule, rd_divisor=1)

# name -> (torch model factory, NCHW input shape, expected layout, expected registry name or None)
EVAL_CASES = {
    "torchvision_resnext50_32x4d": (lambda: torchvision.models.resnext50_32x4d(num_classes=NUM_CLASSES),
                                    (2, 3, 64, 64), "torchvision", "resnext50_32x4d"),
    "torchvision_wide_resnet50_2": (lambda: torchvision.models.wide_resnet50_2(num_classes=NUM_CLASSES),
                                    (2, 3, 64, 48), "torchvision", "wide_resnet50_2"),
    "timm_cbam_resnext50_32x4d": (lambda: timm.create_model("resnext50_32x4d", block_args=dict(attn_layer="cbam"),
                                                            num_classes=NUM_CLASSES),
                                  (2, 3, 64, 64), "timm", "cbam_resnext50_32x4d"),
    "timm_se_resnext50_32x4d": (lambda: timm.create_model("resnext50_32x4d", block_args=dict(attn_layer="se"),
                                                          num_classes=NUM_CLASSES),
                                (2, 3, 64, 64), "timm_se", "se_resnext50_32x4d"),
    "timm_cbam_wide_resnet18_1_5": (lambda: timm.create_model("resnet18", channels=(96, 192, 384, 768),
                                                              block_args=dict(attn_layer="cbam"),
                                                              num_classes=NUM_CLASSES),
                                    (2, 3, 64, 64), "timm", "cbam_wide_resnet18_1_5"),
    "pytorchcv_seresnext50_32x4d": (lambda: pytorchcv_model("seresnext50_32x4d"), (2, 3, 64, 64), "pytorchcv",
                                    "se_resnext50_32x4d"),
    "pytorchcv_resnext50_32x4d": (lambda: pytorchcv_model("resnext50_32x4d"), (1, 3, 64, 80), "pytorchcv",
                                  "resnext50_32x4d"),
    "pytorchcv_mobilenet_w1": (lambda: pytorchcv_model("mobilenet_w1"), (2, 3, 64, 64), "pytorchcv_mobilenet",
                               "mobilenet_w1"),
    "pytorchcv_mobilenet_wd4": (lambda: pytorchcv_model("mobilenet_wd4"), (2, 3, 48, 64), "pytorchcv_mobilenet",
                                "mobilenet_wd4"),
}


def assert_logits_close(logits, torch_model, x):
    """Within LOGIT_RTOL of the logit scale of PyTorch's float32 result, or, where float32 itself is
    worse than that (deep random-BN nets give large logits), no further from PyTorch's float64 result
    than PyTorch's own float32 one. Returns (max abs difference to float32, logit scale)."""
    with torch.no_grad():
        expected = torch_model(x).numpy()
        exact = copy.deepcopy(torch_model).double()(x.double()).numpy()
    scale = float(np.max(np.abs(expected)))
    diff = float(np.max(np.abs(logits - expected)))
    if diff > LOGIT_RTOL * scale:
        assert np.max(np.abs(logits - exact)) <= 1.5 * np.max(np.abs(expected - exact)), (diff, scale)
    return diff, scale


@pytest.mark.parametrize("name", EVAL_CASES)
def test_eval_logits_and_conversion_both_ways(name):
    factory, shape, layout, arch = EVAL_CASES[name]
    torch.manual_seed(0)
    torch_model = prepare(factory(), shape)
    state = torch_model.state_dict()
    detected = detect({k: v.numpy() for k, v in state.items()})
    assert detected.layout == layout and (arch is None or detected.arch == arch)
    model, variables = from_torch(state)
    x, _ = batch(shape, NUM_CLASSES)
    logits = np.asarray(jax.jit(model.apply)(variables, nhwc(x)))
    diff, scale = assert_logits_close(logits, torch_model, x)
    print(f"\n{name}: {detected.describe()}: eval logits max abs diff {diff:.2e} (logit scale {scale:.2f})")
    restored = to_torch(variables, arch=model, layout=layout)
    assert set(restored) == set(state)
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(restored[key].numpy(), value.numpy(), err_msg=key)


def _features_case(name):
    """(timm features_only model, the same weights as a timm classifier, our features_only model name)."""
    torch.manual_seed(0)
    classifier = prepare(timm.create_model(name, num_classes=NUM_CLASSES), (2, 3, 64, 64))
    features = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3, 4), num_classes=NUM_CLASSES)
    features.load_state_dict({k: v for k, v in classifier.state_dict().items() if not k.startswith("fc.")})
    return classifier, features.eval()


@pytest.mark.parametrize("name", ["resnext50_32x4d", "wide_resnet50_2"])
def test_features_only_matches_timm(name):
    classifier, timm_features = _features_case(name)
    model, variables = from_torch(classifier.state_dict())
    backbone = model.clone(features_only=True, out_indices=(0, 1, 2, 3, 4))
    variables = {c: {k: v for k, v in variables[c].items() if k != "fc"} for c in variables}
    x, _ = batch((2, 3, 64, 64), NUM_CLASSES)
    with torch.no_grad():
        expected = [f.numpy().transpose(0, 2, 3, 1) for f in timm_features(x)]
        exact = [f.numpy().transpose(0, 2, 3, 1) for f in copy.deepcopy(timm_features).double()(x.double())]
    found = [np.asarray(f) for f in jax.jit(backbone.apply)(variables, nhwc(x))]
    assert [f.shape for f in found] == [e.shape for e in expected]
    assert [i.channels for i in backbone.feature_info] == timm_features.feature_info.channels()
    assert [i.reduction for i in backbone.feature_info] == timm_features.feature_info.reduction()
    for f, e, e64 in zip(found, expected, exact):
        # Within 1e-5 of the map's scale, or no further from float64 than PyTorch's own float32 result.
        if np.max(np.abs(f - e)) > LOGIT_RTOL * max(1.0, float(np.max(np.abs(e)))):
            assert np.max(np.abs(f - e64)) <= 1.5 * np.max(np.abs(e - e64))


def test_mobilenet_features_match_pytorchcv_stages():
    """timm's MobileNet v1 is another network; pytorchcv's stage outputs are the reference."""
    torch.manual_seed(0)
    torch_model = prepare(pytorchcv_model("mobilenet_wd2"), (2, 3, 64, 64))
    model, variables = from_torch(torch_model.state_dict())
    backbone = model.clone(features_only=True, out_indices=(0, 1, 2, 3, 4, 5))
    x, _ = batch((2, 3, 64, 64), NUM_CLASSES)
    expected, y = [], x
    with torch.no_grad():
        for child_name, child in torch_model.features.named_children():
            if child_name == "final_pool":
                break
            y = child(y)
            expected.append(y.numpy().transpose(0, 2, 3, 1))
    variables = {c: {k: v for k, v in variables[c].items() if k != "fc"} for c in variables}
    found = [np.asarray(f) for f in jax.jit(backbone.apply)(variables, nhwc(x))]
    assert [f.shape for f in found] == [e.shape for e in expected]
    for f, e in zip(found, expected):
        assert np.max(np.abs(f - e)) <= LOGIT_RTOL * max(1.0, float(np.max(np.abs(e))))


# name -> (torch factory, input shape, layout, the cbam-jax model (explicit: these short nets have no name))
TRAIN_CASES = {
    "resnext_cbam_timm": (lambda: timm_short(TimmBottleneck, "cbam", cardinality=32, base_width=4), (4, 3, 64, 64),
                          "timm", lambda: ResNet((1, 1, 1, 1), groups=32, base_width=4, num_classes=NUM_CLASSES,
                                                 attention="cbam", attention_options=VARIANTS["timm"]["cbam"],
                                                 zero_init_residual=True)),
    "wide_resnet18_se_timm": (lambda: timm_short(TimmBasicBlock, se_unrounded, channels=(96, 192, 384, 768)),
                              (4, 3, 64, 64), "timm_se",
                              lambda: ResNet((1, 1, 1, 1), block="basic", stage_widths=(96, 192, 384, 768),
                                             num_classes=NUM_CLASSES, attention="se")),
    "mobilenet_wd4_pytorchcv": (lambda: pytorchcv_model("mobilenet_wd4"), (4, 3, 64, 64), "pytorchcv_mobilenet",
                                lambda: create_model("mobilenet_wd4", num_classes=NUM_CLASSES)),
}
# SGD-momentum steps compared per case. The plain 28-layer MobileNet with PyTorch's initialisation and
# BN scales up to 1.5 has first-step gradients up to 90x its weights' size: after its first step at lr
# 0.1 (also 0.01, 0.001; batch 4-16, 64-128 px) the second step's float32 parameters of PyTorch itself
# differ from float64 by 1-45% per tensor, so a second step there compares rounding noise, not code.
# The short CBAM-ResNeXt's channel gate in its last stage takes a max over 2 x 2 positions per channel
# (4 x 2048 maxima) after a BatchNorm over 16 values: after the first step one of those maxima (image
# 3, channel 1417) is a near-tie, 2.9e-6 apart in float64 while float32 rounding moves the values by
# ~1e-5, so which position receives the second step's gradient is decided by rounding (PyTorch's
# float32 kept float64's order, cbam-jax's, on an AVX2-only CPU with either implementation, did not:
# 2.8e-3 off in the stem's kernel, every other tensor within 1.3e-3; the first step agrees to 2e-6).
STEPS = {"mobilenet_wd4_pytorchcv": 1, "resnext_cbam_timm": 1}


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_training_matches(name):
    factory, shape, layout, flax_factory = TRAIN_CASES[name]
    steps = STEPS.get(name, 2)
    torch.manual_seed(0)
    torch_model = prepare(factory(), shape)
    model = flax_factory()
    variables = load_variables(read_state_dict(torch_model.state_dict()), model, get_layout(layout))
    x, y = batch(shape, NUM_CLASSES)
    buffers = {k: v.numpy() for k, v in torch_model.state_dict().items() if "running" in k}
    exact_steps, _ = train_torch(copy.deepcopy(torch_model).double(), x, y, steps)
    torch_steps, bn_info = train_torch(torch_model, x, y, steps)
    flax_steps = train_flax(model, variables, nhwc(x), y.numpy(), steps)

    def as_flax(params, stats):
        return load_variables(read_state_dict({**params, **stats}), model, get_layout(layout))

    scale = float(np.max(np.abs(torch_steps.train_logits)))
    train_diff = float(np.max(np.abs(flax_steps.train_logits - torch_steps.train_logits)))
    if train_diff > LOGIT_RTOL * scale:  # train-mode BN over few values: no further from float64 than PyTorch's float32
        assert np.max(np.abs(flax_steps.train_logits - exact_steps.train_logits)) <= 1.5 * np.max(
            np.abs(torch_steps.train_logits - exact_steps.train_logits))
    assert abs(flax_steps.loss - exact_steps.loss) <= max(1e-5, 1.5 * abs(torch_steps.loss - exact_steps.loss))
    grad_error = assert_matches_float64(flax_steps.grads, as_flax(torch_steps.grads, buffers)["params"],
                                        as_flax(exact_steps.grads, buffers)["params"], rtol=GRAD_RTOL, label="gradient")
    expected_stats = as_flax(torch_steps.grads, flax_running_stats(torch_steps.stats, bn_info))["batch_stats"]
    stats_error = assert_close_per_tensor(flax_steps.stats, expected_stats, rtol=1e-4, label="running stat")
    step_error = assert_matches_float64(flax_steps.params, as_flax(torch_steps.params, buffers)["params"],
                                        as_flax(exact_steps.params, buffers)["params"], rtol=GRAD_RTOL,
                                        label=f"parameter after {steps} SGD-momentum step(s)")
    print(f"\n{name}: train logits {train_diff:.2e} (scale {scale:.2f}), worst relative: grads {grad_error:.2e}, "
          f"BN stats {stats_error:.2e}, params after {steps} SGD-momentum step(s) {step_error:.2e}")


@pytest.mark.parametrize("name", ["cbam_resnext50_32x4d", "se_mobilenet_wd4"])
def test_cpu_fast_path_model_equals_xla(name):
    """A registered model on the CPU path (its grouped and depthwise convolutions in oneDNN too) gives
    XLA's logits and training gradients: the quarter-width MobileNet whole, the ResNeXt-50 at width 16
    with one block per stage (every stage's grouped 3x3 and projection; 16 blocks compile for ~45 s)."""
    fast = create_model(name, num_classes=NUM_CLASSES, implementation="cpu", reduction=4,
                        **({"width": 16} if "resnext" in name else {}))
    if "resnext" in name:
        fast = fast.clone(stage_sizes=(1, 1, 1, 1))
    reference = fast.clone(implementation="xla")
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    variables = jax.jit(reference.init)(jax.random.key(0), x)  # eagerly, each initializer compiles apart
    fast_logits = jax.jit(fast.apply)(variables, x)
    xla_logits = jax.jit(reference.apply)(variables, x)
    scale = float(jnp.max(jnp.abs(xla_logits)))
    assert float(jnp.max(jnp.abs(fast_logits - xla_logits))) <= LOGIT_RTOL * scale

    def loss(model, params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(logits**2)

    fast_grads = jax.jit(jax.grad(functools.partial(loss, fast)))(variables["params"])
    xla_grads = jax.jit(jax.grad(functools.partial(loss, reference)))(variables["params"])
    # Relative to each gradient's scale, floored at 1% of the largest one (tiny BN-scale gradients are
    # differences of large sums: their float32 rounding is relative to those sums).
    floor = 1e-2 * max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(xla_grads))
    for (path, g_fast), g_xla in zip(jax.tree_util.tree_leaves_with_path(fast_grads), jax.tree.leaves(xla_grads)):
        scale = max(float(jnp.max(jnp.abs(g_xla))), floor)
        assert float(jnp.max(jnp.abs(g_fast - g_xla))) <= 1e-3 * scale, jax.tree_util.keystr(path)
