"""The pytorchcv layouts proven against the pytorchcv package's own model classes: BAM-ResNets (their
own key layout, `pytorchcv_bam`), SE-ResNets, CBAM-ResNets and plain ResNets: detection at every depth,
eval logits against PyTorch, and the way back (`to_torch` loads with strict=True)."""

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
model_provider = pytest.importorskip("pytorchcv.model_provider")

import jax  # noqa: E402

from cbam_jax.convert import detect, from_torch, to_torch  # noqa: E402
from tests.torch_refs.harness import batch, nhwc, prepare  # noqa: E402

# pytorchcv name -> cbam-jax name. Its `resnet50`/`seresnet50` (v1, stride on the first 1x1) are not
# cbam-jax models; the `b` models are.
MODELS = {
    **{f"bam_resnet{d}": f"bam_resnet{d}" for d in (18, 34, 50, 101, 152)},
    **{f"cbam_resnet{d}": f"cbam_resnet{d}" for d in (18, 34, 50, 101, 152)},
    "seresnet18": "se_resnet18", "seresnet34": "se_resnet34", "seresnet50b": "se_resnet50",
    "seresnet101b": "se_resnet101", "seresnet152b": "se_resnet152",
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50b": "resnet50", "resnet101b": "resnet101",
    "resnet152b": "resnet152",
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny inputs: a thread pool only waits
    yield
    torch.set_num_threads(threads)


def shapes_only(model):
    return {k: np.broadcast_to(np.float32(0), v.shape) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("pytorchcv_name", MODELS)
def test_detects_every_pytorchcv_model(pytorchcv_name):
    with torch.device("meta"):
        model = model_provider.get_model(pytorchcv_name)
    found = detect(shapes_only(model))
    expected_layout = "pytorchcv_bam" if pytorchcv_name.startswith("bam") else "pytorchcv"
    assert (found.layout, found.arch, found.stem, found.num_classes) == (expected_layout, MODELS[pytorchcv_name],
                                                                         "imagenet", 1000)


def logits_error(reference, model, variables, shape):
    """Max |logit difference| against PyTorch float32, and (Flax, PyTorch float32) error against float64."""
    x, _ = batch(shape, 10)
    with torch.no_grad():
        expected = reference(x).numpy()
        exact = copy.deepcopy(reference).double()(x.double()).numpy()
    logits = np.asarray(model.apply(variables, nhwc(x)), np.float64)
    return float(np.max(np.abs(logits - expected))), float(np.max(np.abs(expected))), \
        float(np.max(np.abs(logits - exact))), float(np.max(np.abs(expected - exact)))


@pytest.mark.slow  # full-model parity
@pytest.mark.parametrize("pytorchcv_name", ["bam_resnet18", "seresnet18", "cbam_resnet18", "resnet18"])
def test_eval_logits_match_pytorchcv(pytorchcv_name):
    torch.manual_seed(0)
    reference = model_provider.get_model(pytorchcv_name, num_classes=10)
    reference.features.final_pool = torch.nn.AdaptiveAvgPool2d(1)  # its AvgPool2d(7) is global at 224 only
    reference = prepare(reference, (2, 3, 64, 64))
    model, variables = from_torch(reference.state_dict())
    assert model.attention == {"bam": "bam", "ser": "se", "cba": "cbam", "res": None}[pytorchcv_name[:3]]
    error, scale, _, _ = logits_error(reference, model, variables, (2, 3, 64, 64))
    print(f"\n{pytorchcv_name}: eval logits max abs diff {error:.2e} (scale {scale:.1f})")
    assert error <= 1e-5 * max(1.0, scale)
    assert_round_trip(reference, model, variables, model_provider.get_model(pytorchcv_name, num_classes=10))


@pytest.mark.slow
def test_bam_resnet50_release_format_at_224():
    """pytorchcv's bam_resnet50 exactly as published (1000 classes, AvgPool2d(7) head, 224x224), back and forth."""
    torch.manual_seed(0)
    reference = prepare(model_provider.get_model("bam_resnet50"), (2, 3, 224, 224))
    model, variables = from_torch(reference.state_dict())
    assert (model.attention, model.stage_sizes, model.num_classes) == ("bam", (3, 4, 6, 3), 1000)
    error, scale, error64, torch_error64 = logits_error(reference, model, variables, (2, 3, 224, 224))
    print(f"\nbam_resnet50 224x224: eval logits max abs diff {error:.2e} at logit scale {scale:.0f} "
          f"({error / scale:.1e} relative); against float64: Flax {error64:.2e}, PyTorch float32 {torch_error64:.2e}")
    # Random BatchNorm scales blow ResNet-50 + BAM logits up to ~1e3, where float32 is ~1e-3 off in both.
    assert error <= 1e-5 * scale
    assert_round_trip(reference, model, variables, model_provider.get_model("bam_resnet50"))


def assert_round_trip(reference, model, variables, restored):
    """Written back in its pytorchcv layout, every tensor loads (strict) and equals the original."""
    layout = "pytorchcv_bam" if model.attention == "bam" else "pytorchcv"
    restored.load_state_dict(to_torch(jax.device_get(variables), arch=model, layout=layout), strict=True)
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(restored.state_dict()[key], value), key
