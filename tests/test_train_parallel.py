"""With 8 fake CPU devices (in a subprocess, so this pytest process keeps one device): a step under
'jit' (Mesh, sharded batch), a step under 'pmap' and a plain single-device step give the same
parameters, batch statistics and metrics; batches the devices cannot split fail early."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 8)
import functools
import numpy as np
import jax.numpy as jnp
from cbam_jax import ResNet
from cbam_jax.training import step as step_lib
from cbam_jax.training.config import base_config
from cbam_jax.training.optim import make_optimizer
from cbam_jax.training.parallel import DataParallel

assert jax.device_count() == 8
config = base_config()
config.weight_decay = 1e-3
# Two small stages keep the three compilations short; every layer kind of a CBAM-ResNet is there.
model = ResNet(stage_sizes=(1, 1), block="basic", num_classes=10, stem="cifar", attention="cbam",
               attention_options={"reduction": 4}, width=8)
tx = make_optimizer(config, 0.1)
host = jax.device_get(step_lib.create_state(model, tx, jax.random.key(0), (8, 8, 1), False))
rng = np.random.default_rng(0)
batches = [{"image": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), "label": rng.integers(0, 10, 16).astype(np.int32)}
           for _ in range(2)]
common = dict(num_classes=10, mean=(0.3,), std=(0.4,))

single = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx, label_smoothing=0.1,
                                   dynamic_loss_scale=False, **common))
state = jax.device_put(host, jax.devices()[0])
for batch in batches:
    state, metrics = single(state, batch)
results = {"single": (jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()})}
for mode in ("jit", "pmap"):
    parallel = DataParallel(mode, model, tx, label_smoothing=0.1, dynamic_loss_scale=False, **common)
    placed = parallel.place_state(host)
    for batch in batches:
        placed, metrics = parallel.train_step(placed, parallel.place_batch(batch))
    results[mode] = (parallel.to_host(placed), parallel.metrics_to_host(metrics))
    eval_batch = {**batches[0], "mask": np.arange(16) < 11}
    variables = parallel.place_state({"params": host.params, "batch_stats": host.batch_stats})
    assert parallel.metrics_to_host(parallel.eval_step(variables, parallel.place_batch(eval_batch)))["count"] == 11

differences = {}
for mode in ("jit", "pmap"):
    for part in ("params", "batch_stats", "opt_state"):
        a = jax.tree.leaves(getattr(results["single"][0], part))
        b = jax.tree.leaves(getattr(results[mode][0], part))
        differences[f"{mode}/{part}"] = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))
    for key in ("loss_sum", "correct", "count"):
        differences[f"{mode}/{key}"] = abs(results["single"][1][key] - results[mode][1][key])
moved = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(host.params), jax.tree.leaves(results["jit"][0].params)))
try:
    DataParallel.check_batch_size(12)
    error = None
except ValueError as e:
    error = str(e)
print("RESULT", json.dumps({"differences": differences, "moved": moved, "error": error}))
"""


@pytest.mark.slow
def test_jit_pmap_and_single_device_steps_agree():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    assert result["moved"] > 1e-3  # the steps really changed the parameters
    for name, difference in result["differences"].items():
        assert difference <= 1e-5, (name, difference)
    assert "not divisible by the 8 devices" in result["error"] and "multiple of 8" in result["error"]
