"""The benchmark's PyTorch twins are the same networks as cbam-jax's; its report arithmetic."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.throughput import Case, model_flops, ratios
from cbam_jax.registry import create_model


def _jax_param_count(name: str, stem: str, num_classes: int, size: int) -> int:
    model = create_model(name, stem=stem, num_classes=num_classes)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))["params"]
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name, stem, num_classes, size", [("cbam_resnet18", "cifar", 10, 32),
                                                           ("resnet18", "cifar", 10, 32),
                                                           ("cbam_resnet50", "imagenet", 1000, 64)])
def test_torch_twin_has_the_same_parameters(name, stem, num_classes, size):
    pytest.importorskip("torch")
    from benchmarks.torch_models import ResNet

    depth = int(name.rsplit("resnet", 1)[1])
    twin = ResNet(depth, num_classes, stem, attention=name.startswith("cbam_"))
    assert sum(p.numel() for p in twin.parameters()) == _jax_param_count(name, stem, num_classes, size)


def test_case_parsing():
    assert Case.parse("cbam_resnet18:32:64:cifar") == Case("cbam_resnet18", 32, 64, "cifar")
    assert Case.parse("cbam_resnet50:224:8").stem == "imagenet"
    for bad in ("cbam_resnet50:224", "cbam_resnet51:224:8", "cbam_resnet50:224:8:mnist", "cbam_resnet50:x:8"):
        with pytest.raises(argparse.ArgumentTypeError):
            Case.parse(bad)


def test_ratios_compare_jax_with_torch_and_cbam_with_plain():
    def row(arch, impl, images_per_s, step_s):
        return {"case": "c", "arch": arch, "mode": "train", "dtype": "float32", "impl": impl,
                "images_per_s": images_per_s, "step_s_median": step_s}

    rows = [row("cbam", "jax", 30.0, 2.0), row("cbam", "torch", 20.0, 3.0),
            row("plain", "jax", 40.0, 1.5), row("plain", "torch", 25.0, 2.4)]
    by_impl = {(e["arch"], e["impl"]): e for e in ratios(rows)}
    assert by_impl["cbam", "jax"]["jax_over_torch"] == pytest.approx(1.5)
    assert by_impl["cbam", "jax"]["cbam_cost"] == pytest.approx(2.0 / 1.5)
    assert by_impl["cbam", "torch"]["cbam_cost"] == pytest.approx(3.0 / 2.4)
    assert by_impl["plain", "jax"]["jax_over_torch"] == pytest.approx(40 / 25)
    assert ("plain", "torch") not in by_impl


@pytest.mark.parametrize("model, giga_macs", [("resnet18", 1.814), ("resnet50", 4.089)])
def test_model_flops_match_published_counts(model, giga_macs):
    """torchvision's model table: 1.81 / 4.09 GFLOPS (multiply-adds) per 224px image; a train step is 3x."""
    case = Case("cbam_" + model, 224, 2)
    assert model_flops(case, "plain", "infer") == pytest.approx(2 * 2 * giga_macs * 1e9, rel=2e-3)
    assert model_flops(case, "plain", "train") == pytest.approx(3 * model_flops(case, "plain", "infer"))
    assert model_flops(case, "cbam", "infer") > model_flops(case, "plain", "infer")
