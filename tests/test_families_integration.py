"""The other families through the generic code paths: train.py (a few steps per family), NNX and weight
transfer from a plain model's folder (`init_from`). Export: tests/test_artifacts.py; attention maps and
Grad-CAM: tests/test_visualize.py."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import create_model, init_from
from cbam_jax.pretrained import save_pretrained
from tests.helpers import random_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # train.py in a subprocess (25-50 s each on two cores): one attention model per family
@pytest.mark.parametrize("name, width", [("cbam_resnext50_32x4d", 16), ("se_wide_resnet18_2", 8),
                                         ("cbam_mobilenet_w1", 8)])
def test_train_py_trains_each_family(tmp_path, name, width):
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
               f"--config.model.name={name}", f"--config.model.width={width}", "--config.num_train_steps=4",
               "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints").is_dir()


def _short_resnext(name, **overrides):
    """A registered ResNeXt-50 at width 16 (3x3 convs of 32 and 64 channels in 32 groups), cut to two
    stages of one block: the grouped convolutions and their attention at a fraction of the compile time."""
    return create_model(name, num_classes=5, width=16, **overrides).clone(stage_sizes=(1, 1))


def _nnx_equals_linen(module, linen):
    """The NNX module's eval-mode logits are the Linen model's on the NNX module's own variables."""
    from flax import nnx

    x = jax.random.normal(jax.random.key(1), (2, 32, 24, 3))
    logits = nnx.jit(lambda module, x: module(x))(module, x)
    expected = jax.jit(linen.apply)(module.linen_variables(), x)
    assert logits.shape == (2, 5) and float(jnp.std(expected)) > 0
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def test_nnx_runs_a_grouped_convolution_model_as_linen():
    import cbam_jax.nnx

    linen = _short_resnext("cbam_resnext50_32x4d", reduction=4)
    _nnx_equals_linen(cbam_jax.nnx.from_linen(linen, random_variables(linen)), linen)


@pytest.mark.slow  # compiles a 13-unit MobileNet twice (NNX and Linen)
def test_nnx_runs_a_depthwise_convolution_model_as_linen():
    import cbam_jax.nnx

    linen = create_model("cbam_mobilenet_wd2", num_classes=5, width=8, reduction=4)
    _nnx_equals_linen(cbam_jax.nnx.from_linen(linen, random_variables(linen)), linen)


def _flat(variables):
    """{'params/layer1_0/conv1/kernel': array, ...}"""
    return {"/".join(str(key.key) for key in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}


@pytest.mark.parametrize("plain, target", [("resnext50_32x4d", "cbam_resnext50_32x4d"),
                                           ("mobilenet_wd2", "cbam_mobilenet_wd2"),
                                           ("mobilenet_wd4", "se_mobilenet_wd4")])
def test_init_from_a_plain_folder_starts_an_attention_model(tmp_path, plain, target):
    """`init_from` reads a plain model's pretrained folder (its family from config.json), keeps every
    backbone tensor and reports exactly the attention tensors as new (taken from `initial`)."""
    def build(name, **overrides):
        if "resnext" in name:
            return _short_resnext(name, **overrides)
        return create_model(name, num_classes=5, width=8, **overrides)

    source_model = build(plain)
    source = random_variables(source_model, seed=1)
    save_pretrained(tmp_path / "plain", source_model, source)
    model = build(target, reduction=4)
    initial = random_variables(model, seed=2)
    variables, report = init_from(tmp_path / "plain", model, initial=initial)

    flat, source_flat, initial_flat = _flat(variables), _flat(source), _flat(initial)
    attention = {path for path in flat if any(part.endswith("attention") for part in path.split("/"))}
    assert attention and set(report.new) == attention and not report.dropped
    assert set(report.loaded) == set(flat) - attention
    for path, leaf in flat.items():
        np.testing.assert_array_equal(leaf, (initial_flat if path in attention else source_flat)[path], err_msg=path)
    logits = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert logits.shape == (1, 5)
