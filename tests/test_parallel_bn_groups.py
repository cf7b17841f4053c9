"""`config.bn_group_size` (BatchNorm statistics per group of devices, via shard_map) on 8 fake CPU
devices, against a hand computation; and the device prefetch that keeps the data-iterator state
of the last batch trained on."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cbam_jax.training.config import base_config, validate
from cbam_jax.training.parallel import DevicePrefetch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json
import jax
jax.config.update("jax_num_cpu_devices", 8)
import numpy as np
import optax
from cbam_jax import ResNet
from cbam_jax.training import step as step_lib
from cbam_jax.training.parallel import DataParallel

model = ResNet(stage_sizes=(1, 1), block="basic", num_classes=10, stem="cifar", attention="cbam",
               attention_options={"reduction": 4}, width=8)
tx = optax.sgd(0.1)
host = jax.device_get(step_lib.create_state(model, tx, jax.random.key(0), (8, 8, 1), False))
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8), "label": rng.integers(0, 10, 16).astype(np.int32)}
common = dict(num_classes=10, mean=(0.3,), std=(0.4,), label_smoothing=0.0, dynamic_loss_scale=False)
after = {}
for group in (0, 2, 8):
    parallel = DataParallel("jit", model, tx, bn_group_size=group, **common)
    placed, metrics = parallel.train_step(parallel.place_state(host), parallel.place_batch(batch))
    after[group] = (parallel.to_host(placed), parallel.metrics_to_host(metrics))

# By hand: 4 groups of 2 devices = 4 groups of 4 consecutive examples, each a separate
# single-device training forward; the step averages their gradients and statistics.
def group_step(images, labels):
    x = step_lib.normalize(images, (0.3,), (0.4,))
    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": host.batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
        return optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 10)).mean(), updates["batch_stats"]
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(host.params)
    return float(loss), stats, grads
groups = [group_step(batch["image"][4 * g:4 * g + 4], batch["label"][4 * g:4 * g + 4]) for g in range(4)]
mean = lambda trees: jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *trees)
grads, stats = mean([g[2] for g in groups]), mean([g[1] for g in groups])
params = jax.tree.map(lambda p, g: p - 0.1 * g, host.params, grads)

# The first BatchNorm in NumPy: conv1 (3x3, padding 1, no bias) of the normalised images, then the
# biased variance and the mean of each group, averaged over the groups, into the running averages.
x = (batch["image"].astype(np.float64) / 255 - 0.3) / 0.4
kernel = np.asarray(host.params["conv1"]["kernel"], np.float64)
padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
conv = sum(padded[:, i:i + 8, j:j + 8, :] @ kernel[i, j] for i in range(3) for j in range(3))
per_group = conv.reshape(4, 4 * 8 * 8, 8)
bn1 = {"mean": 0.1 * per_group.mean(1).mean(0), "var": 0.9 + 0.1 * per_group.var(1).mean(0)}
global_var = 0.9 + 0.1 * conv.reshape(-1, 8).var(0)

diff = lambda a, b: max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
grouped = after[2][0]
print("RESULT", json.dumps({
    "params": diff(grouped.params, params), "batch_stats": diff(grouped.batch_stats, stats),
    "bn1": diff(grouped.batch_stats["bn1"], bn1), "bn1_global_vs_groups": float(np.max(np.abs(global_var - bn1["var"]))),
    "loss": abs(after[2][1]["loss_sum"] / 16 - sum(g[0] for g in groups) / 4),
    "grouped_vs_global_params": diff(grouped.params, after[0][0].params),
    "one_group_vs_global": max(diff(after[8][0].params, after[0][0].params),
                               diff(after[8][0].batch_stats, after[0][0].batch_stats)),
    "moved": diff(grouped.params, host.params),
}))
errors = []
for bad in (3, 16):
    try:
        DataParallel.check_bn_group_size(bad)
    except ValueError as error:
        errors.append(str(error))
print("ERRORS", json.dumps(errors))
"""


@pytest.mark.slow
def test_bn_groups_match_a_hand_computation_on_8_devices():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    result = json.loads(next(line for line in lines if line.startswith("RESULT"))[len("RESULT"):])
    assert result["moved"] > 1e-3  # the step changed the parameters
    # Groups of 2 devices: what 4 separate groups of 4 examples give, averaged.
    for key in ("params", "batch_stats", "bn1", "loss"):
        assert result[key] <= 1e-6, (key, result)
    # ... which is not what global statistics give (so the check above can tell them apart);
    # one group of all 8 devices is the global case.
    assert result["bn1_global_vs_groups"] > 1e-5, result
    assert result["grouped_vs_global_params"] > 1e-4, result
    assert result["one_group_vs_global"] <= 1e-6, result
    errors = json.loads(next(line for line in lines if line.startswith("ERRORS"))[len("ERRORS"):])
    assert len(errors) == 2 and all("does not divide the 8 devices" in e and "[1, 2, 4, 8]" in e for e in errors)


def test_config_bn_group_size_needs_jit_and_is_not_negative():
    config = base_config()
    config.bn_group_size = 2
    assert validate(config).bn_group_size == 2
    for parallel, size in (("pmap", 2), ("jit", -1)):
        config = base_config()
        config.parallel, config.bn_group_size = parallel, size
        with pytest.raises(ValueError, match="bn_group_size"):
            validate(config)


class _Stream:
    """A data iterator with grain's get_state(): the number of batches read."""

    def __init__(self, count):
        self.read, self.count = 0, count

    def __next__(self):
        if self.read == self.count:
            raise StopIteration
        self.read += 1
        return {"x": np.full((2,), self.read)}

    def get_state(self):
        return {"read": self.read}


def test_device_prefetch_reads_ahead_and_keeps_the_state_of_the_last_batch_handed_out():
    placed = []
    stream = _Stream(count=4)
    prefetch = DevicePrefetch(stream, lambda batch: placed.append(int(batch["x"][0])) or batch, size=2)
    assert prefetch.get_state() == {"read": 0}
    first = next(prefetch)
    assert int(first["x"][0]) == 1 and placed == [1, 2]  # the next batch is already placed
    assert prefetch.get_state() == {"read": 1} and stream.read == 2
    assert [int(b["x"][0]) for b in prefetch] == [2, 3, 4]
    assert prefetch.get_state() == {"read": 4}
    with pytest.raises(StopIteration):
        next(prefetch)
