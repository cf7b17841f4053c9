"""train.py end to end on what tests/test_train.py does not cover: float16 and bfloat16 training,
the pmap mode (training and `cbam-jax eval`), and an image folder with a broken image. Tiny model,
few steps; every test runs train.py in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
FEW_STEPS = ("--config.num_train_steps=4", "--config.eval_every_steps=4", "--config.checkpoint_every_steps=4")


def run(command: list[str], **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env}
    return subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)


def train(workdir: Path, *overrides: str, **env) -> subprocess.CompletedProcess:
    return run([sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(workdir), *FEW_STEPS,
                *overrides], **env)


def records(workdir: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, open(workdir / "metrics.jsonl")) if r["split"] == split]


def saved_meta(workdir: Path) -> dict:
    from cbam_jax.training.checkpoint import restore_variables

    return restore_variables(workdir, "latest")[1]


@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_reduced_precision_training(tmp_path, precision):
    result = train(tmp_path, f"--config.precision={precision}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = records(tmp_path, "summary")[-1]
    assert summary["status"] == "finished" and summary["step"] == 4
    train_losses = [r["loss"] for r in records(tmp_path, "train")]
    assert train_losses and all(np.isfinite(train_losses))
    evaluation = records(tmp_path, "eval")[-1]
    assert evaluation["examples"] == 359 and np.isfinite(evaluation["loss"])
    meta = saved_meta(tmp_path)
    assert meta["model_config"]["dtype"] == precision  # the run computed in the precision asked for
    assert json.loads(meta["config"])["precision"] == precision


def test_pmap_training_and_eval(tmp_path):
    devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = train(tmp_path, "--config.parallel=pmap", **devices)
    assert result.returncode == 0, result.stderr[-3000:]
    assert records(tmp_path, "summary")[-1]["status"] == "finished"
    train_eval = records(tmp_path, "eval")[-1]
    outputs = {}
    for mode in ("pmap", "jit"):
        evaluated = run([sys.executable, "-m", "cbam_jax.cli", "eval", "--workdir", str(tmp_path), "--parallel", mode,
                         "--checkpoint", "latest"], **devices)
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        outputs[mode] = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert outputs["pmap"]["count"] == outputs["jit"]["count"] == 359
    # The eval subcommand (both modes) sees the model the training run evaluated at its last step.
    assert outputs["pmap"]["accuracy"] == pytest.approx(train_eval["accuracy"], abs=1e-9)
    assert outputs["jit"]["accuracy"] == pytest.approx(train_eval["accuracy"], abs=1e-9)
    assert outputs["pmap"]["loss"] == pytest.approx(outputs["jit"]["loss"], rel=1e-4)


@pytest.fixture
def folder_dataset(tmp_path) -> tuple[Path, Path]:
    """root/{train,test}/{a,b}/*.png, small grey images, and one broken PNG in train/b."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, count in (("train", 16), ("test", 4)):
        for label, name in enumerate("ab"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 60, (8, 8), dtype=np.uint8) + 150 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index}.png")
    broken = root / "train" / "b" / "broken.png"
    broken.write_bytes((root / "train" / "b" / "0.png").read_bytes()[:40])
    return root, broken


FOLDER = ("--config.dataset.source=folder", "--config.dataset.num_classes=2", "--config.batch_size=8",
          "--config.eval_batch_size=8", "--config.dataset.image_size=8")


def test_folder_with_a_broken_image_names_it(tmp_path, folder_dataset):
    root, broken = folder_dataset
    workdir = tmp_path / "run"
    refused = train(workdir, *FOLDER, f"--config.dataset.data_dir={root}")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert len(lines) == 1 and str(broken) in lines[0] and "verify_images=True" in lines[0]
    assert not workdir.exists()  # the failed run left no folder behind
    skipped = train(workdir, *FOLDER, f"--config.dataset.data_dir={root}", "--config.dataset.verify_images=True")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert str(broken) in skipped.stderr  # the warning names the skipped file
    assert records(workdir, "summary")[-1]["status"] == "finished"
    assert records(workdir, "eval")[-1]["examples"] == 8
