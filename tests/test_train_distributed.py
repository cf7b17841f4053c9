"""Two processes on localhost (jax.distributed, CPU gloo collectives, one device each) train the tiny
recipe into one workdir and end with the same state as a single process with one device."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("--config.num_train_steps=4", "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4")

SCRIPT = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 1)
from cbam_jax.training.config import load_config
from cbam_jax.training.trainer import train_and_evaluate
config = load_config("configs/tiny.py")
config.unlock()
for item in sys.argv[3:]:
    key, value = item.split("=")
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node[parent]
    node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
summary = train_and_evaluate(config, sys.argv[1])
print("RESULT", json.dumps({"process": jax.process_index(), "count": jax.process_count(),
                            "devices": jax.device_count(), "accuracy": summary["final_accuracy"]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(workdir):
    import orbax.checkpoint as ocp
    from cbam_jax.training.checkpoint import Checkpoints

    checkpoints = Checkpoints(str(workdir), keep=2)
    step = checkpoints.latest_step()
    state = checkpoints.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    checkpoints.close()
    return step, state


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    overrides = [s.lstrip("-").removeprefix("config.") for s in STEPS]
    port = _free_port()
    workers = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "two"), str(i), *overrides,
                                 "distributed.enabled=True", f"distributed.coordinator_address=127.0.0.1:{port}",
                                 "distributed.num_processes=2", f"distributed.process_id={i}"],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    single = subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path / "one"), "0", *overrides], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = []
    for process in [*workers, single]:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT"))[len("RESULT"):]))
    assert [(r["process"], r["count"], r["devices"]) for r in results] == [(0, 2, 2), (1, 2, 2), (0, 1, 1)]
    assert results[0]["accuracy"] == results[1]["accuracy"]
    assert abs(results[0]["accuracy"] - results[2]["accuracy"]) <= 1 / 359 + 1e-9
    # Only process 0 writes the metrics; the checkpoint is written once, collectively.
    assert sum(1 for line in open(tmp_path / "two" / "metrics.jsonl") if '"summary"' in line) == 1
    (step_two, two), (step_one, one) = _state(tmp_path / "two"), _state(tmp_path / "one")
    assert step_two == step_one == 4
    import jax
    for a, b in zip(jax.tree.leaves(two["params"]), jax.tree.leaves(one["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Process 0 alone exported the best model; it is the same model as the single process's.
    from cbam_jax.pretrained import load_pretrained
    exported_two, exported_one = (load_pretrained(tmp_path / run / "pretrained")[1] for run in ("two", "one"))
    for a, b in zip(jax.tree.leaves(exported_two), jax.tree.leaves(exported_one)):
        np.testing.assert_allclose(a, b, atol=1e-5)
