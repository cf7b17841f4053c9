"""The other families through the generic code paths: train.py (a few steps per family), NNX, weight
transfer from a plain model (what `init_from` does), export and attention maps."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbam_jax import create_model
from cbam_jax.convert.transfer import transfer_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # train.py in a subprocess
@pytest.mark.parametrize("name, width", [("cbam_resnext50_32x4d", 16), ("se_wide_resnet18_2", 8),
                                         ("cbam_mobilenet_w1", 8), ("resnext50_32x4d", 16)])
def test_train_py_trains_each_family(tmp_path, name, width):
    command = [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run"),
               f"--config.model.name={name}", f"--config.model.width={width}", "--config.num_train_steps=4",
               "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4"]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "checkpoints").is_dir()


@pytest.mark.parametrize("name", ["cbam_resnext50_32x4d", "se_mobilenet_wd2"])
def test_nnx_module_equals_linen(name):
    from flax import nnx

    import cbam_jax.nnx

    overrides = dict(num_classes=5, reduction=4, width=16 if "resnext" in name else 8)
    module = cbam_jax.nnx.create_model(name, rngs=nnx.Rngs(0), **overrides)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    logits = module(x)
    assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
    linen = create_model(name, **overrides)
    linen_params = jax.eval_shape(linen.init, jax.random.key(0), x)["params"]
    count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
    assert count == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(linen_params))


@pytest.mark.parametrize("plain, target", [("resnext50_32x4d", "cbam_resnext50_32x4d"),
                                           ("mobilenet_wd2", "cbam_mobilenet_wd2")])
def test_plain_weights_start_an_attention_model(plain, target):
    overrides = dict(num_classes=5, width=16 if "resnext" in plain else 8)
    x = jnp.zeros((1, 32, 32, 3))
    source = create_model(plain, **overrides).init(jax.random.key(0), x)
    model = create_model(target, reduction=4, **overrides)
    variables, report = transfer_variables(source, model)
    assert not report.dropped and report.new
    assert all("attention" in path for path in report.new), report.new[:3]
    np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"], source["params"]["conv1"]["kernel"])
    assert model.apply(variables, x).shape == (1, 5)
