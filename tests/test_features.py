"""Multi-scale features (`features_only`, `out_indices`, `feature_info`): shapes and strides, the same
values as inside the classifier, classifier weights loadable as they are, and parity with PyTorch for
every depth x variant x stem (timm's own `features_only=True`; forward hooks on the references)."""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import create_model
from cbam_jax.convert.transfer import transfer_variables
from cbam_jax.registry import model_config, model_from_config
from tests.helpers import random_variables

ALL = (0, 1, 2, 3, 4)
ATTENTIONS = ("", "se_", "cbam_", "bam_")


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("prefix", ATTENTIONS)
@pytest.mark.parametrize("stem, size", [("imagenet", 64), ("cifar", 32)])
def test_shapes_follow_feature_info(depth, prefix, stem, size):
    model = create_model(f"{prefix}resnet{depth}", stem=stem, features_only=True, out_indices=ALL)
    x = jax.ShapeDtypeStruct((2, size, size + 8, 3), jnp.float32)
    features, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), x)
    expansion = 1 if depth < 50 else 4
    strides = (2, 4, 8, 16, 32) if stem == "imagenet" else (1, 1, 2, 4, 8)
    assert [(f.channels, f.reduction) for f in model.feature_info] == \
        [(64, strides[0])] + [(64 * 2**i * expansion, strides[i + 1]) for i in range(4)]
    assert [f.module for f in model.feature_info] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [f.shape for f in features] == [(2, math.ceil(size / f.reduction), math.ceil((size + 8) / f.reduction),
                                            f.channels) for f in model.feature_info]
    assert "fc" not in variables["params"]


def test_default_indices_truncation_and_config_round_trip():
    model = create_model("bam_resnet50", features_only=True)
    assert [f.index for f in model.feature_info] == [1, 2, 3, 4]
    assert [f.reduction for f in model.feature_info] == [4, 8, 16, 32]  # the ImageNet stem
    short = create_model("bam_resnet50", features_only=True, out_indices=(1, 2))
    shapes = jax.eval_shape(short.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert sorted(k for k in shapes["params"] if not k.startswith("layer")) == ["bam1", "bam2", "bn1", "conv1"]
    assert max(int(k[5]) for k in shapes["params"] if k.startswith("layer")) == 2
    config = model_config(short)
    assert config["out_indices"] == [1, 2] and config["features_only"] is True
    assert model_from_config(config) == short
    for bad in [(2, 1), (), (1, 5), (-1,), (1, 1), ("1",)]:
        with pytest.raises(ValueError, match="out_indices"):
            create_model("resnet18", out_indices=bad)
    with pytest.raises(ValueError, match="features_only"):
        create_model("resnet18", features_only="yes")


@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow), "cbam_resnet18",
                                  pytest.param("bam_resnet18", marks=pytest.mark.slow),
                                  pytest.param("se_resnet50", marks=pytest.mark.slow)])  # CBAM's case fast
def test_features_are_the_classifiers_stage_outputs(name):
    """The backbone computes exactly what the classifier computes inside, from the classifier's weights."""
    classifier = create_model(name, num_classes=3, stem="cifar", width=8, **({"reduction": 4} if "_" in name else {}))
    variables = random_variables(classifier, (2, 16, 16, 3))
    backbone = classifier.clone(features_only=True, out_indices=(1, 2, 3, 4))
    loaded, report = transfer_variables(variables, backbone)
    assert not report.new and {p.split("/")[1] for p in report.dropped} == {"fc"}
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
    features = backbone.apply(loaded, x)
    assert len(features) == 4

    def stage_ends(module, method_name):  # the last block of each stage, or BAM after it
        return method_name == "__call__" and (module.name or "").startswith(("layer", "bam"))
    _, state = classifier.apply(variables, x, capture_intermediates=stage_ends, mutable=["intermediates"])
    outputs = state["intermediates"]
    for stage, feature in enumerate(features, start=1):
        last = f"bam{stage}" if f"bam{stage}" in outputs else \
            f"layer{stage}_{classifier.stage_sizes[stage - 1] - 1}"
        np.testing.assert_array_equal(feature, outputs[last]["__call__"][0])


def test_low_precision_features_keep_the_compute_dtype():
    model = create_model("cbam_resnet18", stem="cifar", width=8, reduction=4, dtype=jnp.bfloat16,
                         features_only=True, out_indices=(0, 4))
    features, _ = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x), jnp.zeros((1, 16, 16, 3)))
    assert [f.dtype for f in features] == [jnp.bfloat16, jnp.bfloat16]


# ---- parity with PyTorch, every depth x variant x stem -----------------------------------------------------------
#
# References: timm's own features_only=True (timm variant, ImageNet stem; the CIFAR stem is not a timm
# model, so hooks on a timm ResNet given one); forward hooks on tests/torch_refs (official: plain, CBAM,
# BAM at depths 18-101, as ResidualNet; common: CBAM) and on pytorchcv's classes for what the official
# code lacks (ResNet-152, SE-ResNets: the official math, proven in tests/test_convert_pytorchcv.py).

REFERENCES = [("official", ""), ("official", "se_"), ("official", "cbam_"), ("official", "bam_"),
              ("timm", ""), ("timm", "cbam_"), ("common", "cbam_")]
STEM_INPUTS = {"imagenet": (2, 3, 64, 64), "cifar": (2, 3, 32, 32)}  # layer4: 2x2 and 4x4
RTOL = 1e-5  # of each feature map's scale


def cifar_stem(model, conv_name="conv1", pool_name="maxpool"):
    """Give a torchvision-style ResNet the CIFAR stem: 3x3/1 conv, no max pool."""
    import torch
    setattr(model, conv_name, torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False))
    setattr(model, pool_name, torch.nn.Identity())
    return model


def torch_reference(variant, prefix, depth, stem):
    """(torch model, {feature index: module whose output it is}, or None when timm's features_only is used)."""
    import torch
    from tests.torch_refs import common, official

    if variant == "timm":
        import timm
        model = timm.create_model(f"resnet{depth}", num_classes=10,
                                  block_args=dict(attn_layer="cbam") if prefix else None)
        if stem == "imagenet":
            return model, None
        return cifar_stem(model), {0: "act1", **{s: f"layer{s}" for s in range(1, 5)}}
    if variant == "common":
        model = common.resnet_cbam(depth, 10)
        model = cifar_stem(model) if stem == "cifar" else model
        return model, {0: "relu", **{s: f"layer{s}" for s in range(1, 5)}}
    if depth != 152 and prefix != "se_":
        network = {"imagenet": "ImageNet", "cifar": "CIFAR10"}[stem]
        model = official.ResidualNet(network, depth, 10, {"": None, "cbam_": "CBAM", "bam_": "BAM"}[prefix],
                                     global_pool=True)
        return model, {0: "relu", **{s: f"bam{s}" if prefix == "bam_" and s < 4 else f"layer{s}" for s in range(1, 5)}}
    model_provider = pytest.importorskip("pytorchcv.model_provider")
    from pytorchcv.models.common.conv import conv3x3_block
    suffix = "b" if depth >= 50 and prefix in ("", "se_") else ""  # the stride on the 3x3 convolution
    name = {"": "resnet", "se_": "seresnet", "cbam_": "cbam_resnet", "bam_": "bam_resnet"}[prefix] + f"{depth}{suffix}"
    model = model_provider.get_model(name, num_classes=10)
    model.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)
    if stem == "cifar":
        class CifarInit(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = conv3x3_block(in_channels=3, out_channels=64)

            def forward(self, x):
                return self.conv(x)
        model.features.init_block = CifarInit()
    stages = {s: f"features.stage{s + 1}.unit1.bam" if prefix == "bam_" and s < 4 else f"features.stage{s}"
              for s in range(1, 5)}
    return model, {0: "features.init_block.conv", **stages}


def settle_batchnorm(model, input_shape, seed=0):
    """`harness.prepare` (random BatchNorm affine parameters and biases), then running statistics equal to the
    batch statistics of 16 random images (one train-mode pass at momentum 1), so that the eval-mode network
    normalises as in training. After `prepare` alone (three passes at PyTorch's momentum 0.1) the statistics
    stay near their 0/1 start and random ResNet-152s grow activations to 1e4, where rounding flips ReLUs:
    even float64 results then differ by 1e-3."""
    import torch
    from tests.torch_refs.harness import prepare

    prepare(model, input_shape, seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(torch.randn((16, *input_shape[1:]), generator=torch.Generator().manual_seed(seed + 1)))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return model.eval()


def torch_features(model, hooks, x):
    """The hooked modules' outputs (NHWC copies: in-place ReLUs may overwrite them later)."""
    import torch
    outputs = {}
    handles = [model.get_submodule(module).register_forward_hook(
        lambda _, __, out, index=index: outputs.__setitem__(index, out.detach().numpy().transpose(0, 2, 3, 1).copy()))
        for index, module in hooks.items()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return [outputs[i] for i in ALL]


@pytest.fixture
def torch_one_thread():
    """PyTorch on one thread: at these tiny sizes its thread pool only waits (10x slower on a busy machine)."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
# ResNet-101/152 run ResNet-50's code (bottleneck blocks, more of them per stage): 18, 34 and 50 cover
# every code path; the deeper stage sizes are checked by their parameter counts in test_resnet.py.
@pytest.mark.parametrize("depth", (18, 34, 50))
@pytest.mark.parametrize("variant, prefix", REFERENCES)
def test_features_match_pytorch(variant, prefix, depth, stem, torch_one_thread):
    torch = torch_one_thread
    pytest.importorskip("timm")
    from cbam_jax.convert import from_torch
    from tests.torch_refs.harness import batch

    torch.manual_seed(depth)
    reference, hooks = torch_reference(variant, prefix, depth, stem)
    reference = settle_batchnorm(reference, STEM_INPUTS[stem])
    x, _ = batch(STEM_INPUTS[stem], 10)
    if hooks is None:
        import timm
        features_net = timm.create_model(f"resnet{depth}", features_only=True, out_indices=ALL,
                                         block_args=dict(attn_layer="cbam") if prefix else None).eval()
        missing, unexpected = features_net.load_state_dict(reference.state_dict(), strict=False)
        assert not missing and set(unexpected) == {"fc.weight", "fc.bias"}
        assert features_net.feature_info.reduction() == [2, 4, 8, 16, 32]
        with torch.no_grad():
            expected = [f.numpy().transpose(0, 2, 3, 1) for f in features_net(x)]
    else:
        expected = torch_features(reference, hooks, x)
    # The structure is judged in float64 on both sides, where rounding cannot hide a difference; float32
    # against PyTorch's float32 too, where deep random nets can be ill-conditioned: there cbam-jax must be
    # as close to the float64 result as PyTorch's float32 is.
    exact = torch_features(copy.deepcopy(reference).double(), hooks or {0: "act1", **{s: f"layer{s}" for s in range(1, 5)}},
                           x.double())

    classifier, variables = from_torch(reference.state_dict(), variant=variant)
    assert (classifier.stem, classifier.attention) == (stem, {"": None, "se_": "se", "cbam_": "cbam",
                                                              "bam_": "bam"}[prefix])
    backbone = classifier.clone(features_only=True, out_indices=ALL)
    loaded, _ = transfer_variables(variables, backbone, new_attention=False)
    features = backbone.apply(loaded, x.numpy().transpose(0, 2, 3, 1))  # eager: XLA's op cache serves all cases
    with jax.enable_x64(True):  # XLA's own kernels: the CPU fast path's BatchNorm computes in float32
        backbone64 = backbone.clone(dtype=jnp.float64, param_dtype=jnp.float64, implementation="xla")
        features64 = backbone64.apply(jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), loaded),
                                      jnp.asarray(x.double().numpy().transpose(0, 2, 3, 1)))
        features64 = [np.asarray(f) for f in features64]
    assert [f.reduction for f in backbone.feature_info] == ([2, 4, 8, 16, 32] if stem == "imagenet" else [1, 1, 2, 4, 8])
    assert len(features) == len(features64) == len(expected) == len(exact) == 5
    for info, got, want, got64, want64 in zip(backbone.feature_info, features, expected, features64, exact):
        assert got.shape == want.shape and got.shape[-1] == info.channels and got64.dtype == np.float64
        scale = max(1.0, float(np.max(np.abs(want64))))
        error_in_float64 = float(np.max(np.abs(got64 - want64)))
        assert error_in_float64 <= RTOL * scale, f"{info.module}: float64 max abs diff {error_in_float64:.2e}"
        error = float(np.max(np.abs(np.asarray(got) - want)))
        error64, torch_error64 = (float(np.max(np.abs(a - want64))) for a in (np.asarray(got, np.float64), want))
        print(f"{info.module}: float64 {error_in_float64 / scale:.1e} relative; float32 {error:.2e} vs torch f32, "
              f"{error / scale:.1e} relative; vs float64: jax {error64:.2e}, torch {torch_error64:.2e}")
        # float32: within RTOL of the scale, or no further from float64 than a few times PyTorch's own
        # float32 error (the structure is checked in float64 above; float32 rounding differs by CPU: 2.3x
        # PyTorch's on an AVX-512 EPYC without AMX, common-cbam_-50-cifar layer4). A wrong layer is O(scale).
        assert error <= RTOL * scale or error64 <= 4 * torch_error64, \
            f"{info.module}: max abs diff {error:.2e} at scale {scale:.1f} (float64: jax {error64:.2e}, torch {torch_error64:.2e})"
