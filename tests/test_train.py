"""The trainer end to end through train.py (subprocesses sharing one compilation cache): exact
resume after a stop and after SIGKILL, NaN loss, a workdir of another architecture, the eval
subcommand and the default recipe's accuracy on the embedded digits."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # every test runs train.py in a subprocess (or needs such a run)


def train_command(workdir, *overrides, config="configs/tiny.py"):
    return [sys.executable, "train.py", "--config", config, "--workdir", str(workdir),
            "--config.compilation_cache_dir=", *overrides]  # the session's cache (tests/conftest.py), configs/default.py too


def train_env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_train(workdir, *overrides, config="configs/tiny.py"):
    return subprocess.run(train_command(workdir, *overrides, config=config), cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=600)


# Checkpoints every 2 steps and an evaluation every step slow a tiny run down enough to signal it mid-way.
SLOW_OVERRIDES = ("--config.checkpoint_every_steps=2", "--config.eval_every_steps=1")


def start_train_until(workdir, ready, stdout=subprocess.DEVNULL):
    """Start a slowed-down tiny run in the background and return it once `ready()` holds."""
    process = subprocess.Popen(train_command(workdir, *SLOW_OVERRIDES), cwd=ROOT, env=train_env(),
                               stdout=stdout, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be signalled"
    return process


def final_state(workdir):
    """The latest checkpoint's state (host arrays) and its step."""
    from cbam_jax.training.checkpoint import Checkpoints
    import orbax.checkpoint as ocp

    checkpoints = Checkpoints(str(workdir), keep=2)
    step = checkpoints.latest_step()
    if step is None:
        checkpoints.close()
        return None, None
    state = checkpoints.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    checkpoints.close()
    return step, state


def assert_same_state(a, b):
    import jax

    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    result = run_train(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Final test accuracy" in result.stdout
    return workdir, final_state(workdir)


def test_straight_run_writes_logs_and_checkpoints(straight):
    workdir, (step, state) = straight
    assert step == 8 and int(state["step"]) == 8
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    splits = {r["split"] for r in records}
    assert {"train", "eval", "summary"} <= splits
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert all(np.isfinite(r["loss"]) and r["learning_rate"] > 0 for r in train)
    assert [r["examples"] for r in records if r["split"] == "eval"] == [359, 359]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
    assert len(os.listdir(workdir / "best")) == 1


def test_stop_and_resume_is_exact(straight, tmp_path):
    first = run_train(tmp_path, "--config.stop_at_step=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Stopped at step 4" in first.stdout
    assert final_state(tmp_path)[0] == 4
    second = run_train(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    step, state = final_state(tmp_path)
    assert step == 8
    assert_same_state(state, straight[1][1])


def test_sigkill_mid_run_then_resume_is_exact(straight, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    # A finished checkpoint (orbax renames STEP.orbax-checkpoint-tmp-* to STEP when done): the resume
    # below must start from it, not from scratch, for the test to show that resuming is exact.
    process = start_train_until(tmp_path, lambda: checkpoints.is_dir() and any(
        name.isdigit() for name in os.listdir(checkpoints)))
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = final_state(tmp_path)[0]
    assert killed_at is not None and killed_at < 8
    resumed = run_train(tmp_path, *SLOW_OVERRIDES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    step, state = final_state(tmp_path)
    assert step == 8
    assert_same_state(state, straight[1][1])
    # It resumed at killed_at rather than starting again (which would also end in the same state):
    # the steps up to the checkpoint were trained, and logged, once.
    logged = [r["step"] for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["split"] == "train"]
    before_kill = [s for s in logged if s <= killed_at]
    assert before_kill and len(before_kill) == len(set(before_kill))


def test_sigterm_saves_and_exits_cleanly(straight, tmp_path):
    process = start_train_until(tmp_path, lambda: (tmp_path / "metrics.jsonl").exists(),
                                stdout=subprocess.PIPE)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 0
    assert "(preempted)" in out
    stopped_at = int(out.split("Stopped at step ")[1].split("/")[0])
    assert final_state(tmp_path)[0] == stopped_at < 8
    resumed = run_train(tmp_path, *SLOW_OVERRIDES)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_state(final_state(tmp_path)[1], straight[1][1])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    assert run_train(tmp_path, "--config.stop_at_step=4").returncode == 0
    _, good = final_state(tmp_path)
    result = run_train(tmp_path, "--config.learning_rate=1e30", "--config.allow_config_change=True")
    assert result.returncode == 1
    assert "training loss became" in result.stderr and "last good checkpoint (step 4)" in result.stderr
    step, state = final_state(tmp_path)
    assert step == 4
    assert_same_state(state, good)


def test_workdir_of_another_architecture_fails_early(straight):
    result = run_train(straight[0], "--config.model.name=cbam_resnet34")
    assert result.returncode == 1
    assert "another architecture" in result.stderr and "stage_sizes" in result.stderr
    assert final_state(straight[0])[0] == 8


def test_eval_subcommand_counts_every_example(straight, capsys):
    from cbam_jax.cli import main

    assert main(["eval", "--workdir", str(straight[0]), "--batch-size", "64"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = [json.loads(line) for line in open(straight[0] / "metrics.jsonl") if '"summary"' in line][-1]
    assert result["count"] == 359 and result["split"] == "test"
    assert result["accuracy"] == pytest.approx(summary["best_accuracy"], abs=1e-6)
    assert main(["eval", "--workdir", str(straight[0]) + "/missing"]) == 1
    assert not (straight[0] / "missing").exists()  # a failed eval creates no folders


def test_default_recipe_learns_the_digits(tmp_path):
    # The full recipe (30 epochs) reaches ~99% (README); 4 epochs must already be well above chance.
    result = run_train(tmp_path, "--config.num_epochs=4", "--config.progress_bar=False",
                       config="configs/default.py")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["final_accuracy"] >= 0.85, summary


def _eval_arrays_and_best_logits(workdir, count=24):
    """The first `count` digits test images as the eval pipeline makes them (uint8) and the logits of
    the best checkpoint on them."""
    from cbam_jax.data import eval_batches, make_source
    from cbam_jax.images import normalize
    from cbam_jax.registry import model_from_config
    from cbam_jax.training.checkpoint import restore_variables
    from cbam_jax.training.config import load_config

    config = load_config(os.path.join(ROOT, "configs/tiny.py"))
    batch = next(eval_batches(make_source(config.dataset, "test"), config.dataset, global_batch=count))
    variables, meta = restore_variables(workdir, "best")
    model = model_from_config(meta["model_config"])
    logits = model.apply(variables, normalize(batch["image"], config.dataset.mean, config.dataset.std), train=False)
    return batch["image"], np.asarray(logits), config


def test_finished_run_exports_the_best_model_as_a_pretrained_directory(straight):
    from cbam_jax.pretrained import load_metadata, load_pretrained
    from cbam_jax.images import normalize
    from cbam_jax.training.export import export_pretrained

    workdir = straight[0]
    images, logits, config = _eval_arrays_and_best_logits(workdir)
    metadata = load_metadata(workdir / "pretrained")
    assert metadata["class_names"] == [str(d) for d in range(10)]
    assert metadata["preprocessing"] == {"resize": [8, 8], "crop": 8, "mean": [0.3], "std": [0.4], "channels": 1}
    model, variables = load_pretrained(workdir / "pretrained")
    exported = model.apply(variables, normalize(images, config.dataset.mean, config.dataset.std), train=False)
    np.testing.assert_allclose(np.asarray(exported), logits, atol=1e-6)
    # A second export replaces the first one whole, leaving nothing else behind.
    (workdir / "pretrained" / "marker").write_text("old export")
    export_pretrained(str(workdir), model, config.dataset, None)
    assert not (workdir / "pretrained" / "marker").exists()
    assert sorted(p.name for p in workdir.iterdir() if "pretrained" in p.name) == ["pretrained"]
    np.testing.assert_array_equal(np.asarray(load_pretrained(workdir / "pretrained")[1]["params"]["fc"]["kernel"]),
                                  np.asarray(variables["params"]["fc"]["kernel"]))


def test_predict_on_digit_pngs_equals_the_eval_pipeline(straight, tmp_path, capsys):
    from PIL import Image

    from cbam_jax.cli import main

    images, logits, _ = _eval_arrays_and_best_logits(straight[0])
    paths = []
    for index, image in enumerate(images):  # as greyscale and as RGB files: both become the same 'L' input
        path = tmp_path / f"digit{index}.png"
        grey = Image.fromarray(image[..., 0])
        (grey if index % 2 else grey.convert("RGB")).save(path)
        paths.append(str(path))
    assert main(["predict", "--pretrained", str(straight[0] / "pretrained"), "--top-k", "10", "--json", *paths]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    for line, path, probabilities in zip(lines, paths, expected, strict=True):
        assert line["image"] == path
        got = np.zeros(10)
        for entry in line["top_k"]:
            got[entry["index"]] = entry["probability"]
            assert entry["class"] == str(entry["index"])
        np.testing.assert_allclose(got, probabilities, atol=1e-5)
        assert line["top_k"][0]["index"] == int(np.argmax(probabilities))
