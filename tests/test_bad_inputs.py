"""The bad-input table: every entry point answers a user mistake with exit code != 0, ONE line on
stderr naming the offending input, no traceback, and nothing created or changed.

Each case runs the installed console script `cbam-jax` (the one next to this Python), `train.py`
or `python -m benchmarks.ablation` as a subprocess, with PYTHONPATH = this checkout so that the
code under test is imported (an editable install resolves to it anyway). No torch needed: the
converter cases use .safetensors files. Cases fail before any compilation, so each is a few
seconds of imports; the whole table is marked slow.
"""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from cbam_jax.pretrained import save_pretrained
from cbam_jax.resnet import ResNet
from tests.helpers import randomize

ROOT = Path(__file__).resolve().parents[1]
PREPROCESSING = {"resize": 36, "crop": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "channels": 3}
pytestmark = pytest.mark.slow


def cbam_jax_command() -> list[str]:
    """The installed console script of this Python's environment (`python -m cbam_jax.cli` without one)."""
    script = Path(sys.executable).parent / "cbam-jax"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cbam_jax.cli"]


ENTRY_POINTS = {
    "train.py": lambda: [sys.executable, str(ROOT / "train.py")],
    "cbam-jax": cbam_jax_command,
    "ablation": lambda: [sys.executable, "-m", "benchmarks.ablation"],
}


def safetensors_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A .safetensors file written by hand (the format: 8-byte header length, JSON header, raw data)."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array, np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of bad (and a few good) inputs; every case runs in it and must leave it unchanged."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = ResNet(stage_sizes=(1, 1), block="basic", width=8, stem="cifar", num_classes=3, attention="cbam",
                   attention_options={"reduction": 4})
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    save_pretrained(root / "model", model, variables, metadata={"class_names": ["a", "b", "c"],
                                                                "preprocessing": PREPROCESSING})
    variables["params"]["fc"]["bias"] = variables["params"]["fc"]["bias"].at[0].set(np.nan)
    save_pretrained(root / "nan_model", model, variables, metadata={"preprocessing": PREPROCESSING})
    (root / "afile").write_text("a file, not a folder\n")
    (root / "empty_dir").mkdir()
    (root / "existing_out").mkdir()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(root / "good.png")
    (root / "truncated.png").write_bytes((root / "good.png").read_bytes()[:60])
    (root / "notimage.png").write_text("hello, not a PNG\n")
    Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(root / "float.tif")
    # A valid PNG header that claims 30000 x 30000 pixels: a decompression bomb.
    bomb = (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
            + b"\x00\x00\x00\x00")
    (root / "bomb.png").write_bytes(bomb)
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    safetensors_file(root / "unknown_keys.safetensors", {"encoder.weight": np.ones((3, 3))})
    (root / "class_names_empty.txt").write_text("\n\n")
    (root / "bad_recipe.py").write_text("def get_config(:\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# (entry point, arguments, exit code, text the one line must contain)
CASES = [
    # train.py: the command line and the config
    ("train.py", ["--config.batchsize=3"], 2, "batchsize"),
    ("train.py", ["--config", "configs/nope.py"], 2, "configs/nope.py"),
    ("train.py", ["--config", "bad_recipe.py"], 2, "bad_recipe.py"),
    ("train.py", ["--config.learning_rate=abc"], 2, "abc"),
    ("train.py", ["--config", "configs/detection_shapes.py", "--config.detection.fpn_chanels=16"], 2, "fpn_chanels"),
    ("train.py", ["--bogus=1"], 2, "bogus"),
    ("train.py", ["extra_argument"], 2, "extra_argument"),
    ("train.py", ["--workdir", "afile"], 1, "afile"),
    ("train.py", ["--workdir", "afile/run"], 1, "afile"),
    ("train.py", ["--workdir", "run", "--config.eval_every_steps=-1"], 1, "eval_every_steps"),
    ("train.py", ["--workdir", "run", "--config.model.name=resnet7"], 1, "resnet7"),
    ("train.py", ["--workdir", "run", "--config.optimizer=adam"], 1, "adam"),
    ("train.py", ["--workdir", "run", "--config.label_smoothing=1.5"], 1, "1.5"),
    ("train.py", ["--workdir", "run", "--config.model.reduction=64"], 1, "64"),
    # train.py: data that does not fit the config (the 10-class digits), found before any compile
    ("train.py", ["--workdir", "run", "--config.dataset.num_classes=5"], 1, "num_classes=10"),
    ("train.py", ["--workdir", "run", "--config.batch_size=4096"], 1, "4096"),
    ("train.py", ["--workdir", "run", "--config.dataset.source=folder", "--config.dataset.data_dir=no_such_folder"],
     1, "no_such_folder"),
    ("train.py", ["--workdir", "run", "--config.dataset.eval_split=validation"], 1, "validation"),
    # cbam-jax itself
    ("cbam-jax", [], 2, "required"),
    ("cbam-jax", ["trian"], 2, "trian"),
    # predict
    ("cbam-jax", ["predict", "good.png", "--pretrained", "no_model"], 2, "no_model"),
    ("cbam-jax", ["predict", "good.png", "--pretrained", "afile"], 2, "afile"),
    ("cbam-jax", ["predict", "good.png", "--pretrained", "model", "--top-k", "0"], 2, "--top-k"),
    ("cbam-jax", ["predict", "missing.png", "--pretrained", "model"], 1, "missing.png"),
    ("cbam-jax", ["predict", "truncated.png", "--pretrained", "model"], 1, "truncated.png"),
    ("cbam-jax", ["predict", "bomb.png", "--pretrained", "model"], 1, "bomb.png"),
    ("cbam-jax", ["predict", "float.tif", "--pretrained", "model"], 1, "float.tif"),
    ("cbam-jax", ["predict", "notimage.png", "--pretrained", "model"], 1, "notimage.png"),
    ("cbam-jax", ["predict", "empty_dir", "--pretrained", "model"], 1, "empty_dir"),
    ("cbam-jax", ["predict", "good.png", "--pretrained", "model", "--mean", "0.5", "0.5"], 2, "0.5, 0.5"),
    ("cbam-jax", ["predict", "good.png", "--pretrained", "nan_model"], 2, "--allow-nonfinite"),
    ("cbam-jax", ["predict", "good.png", "--pretrained", "model", "--crop", "abc"], 2, "abc"),
    # attention
    ("cbam-jax", ["attention", "good.png", "--pretrained", "model", "--out", "afile/figures"], 2, "afile"),
    ("cbam-jax", ["attention", "good.png", "--pretrained", "model", "--out", "figures", "--class-index", "99"], 2, "99"),
    ("cbam-jax", ["attention", "good.png", "--pretrained", "model", "--out", "figures", "--grad-cam-block", "layer9_0"],
     2, "layer9_0"),
    ("cbam-jax", ["attention", "truncated.png", "--pretrained", "model", "--out", "figures"], 1, "truncated.png"),
    # eval
    ("cbam-jax", ["eval", "--workdir", "no_run"], 1, "no_run"),
    ("cbam-jax", ["eval", "--workdir", "afile"], 1, "afile"),
    ("cbam-jax", ["eval", "--workdir", "empty_dir"], 1, "empty_dir"),
    ("cbam-jax", ["eval", "--pretrained", "model"], 2, "--config"),
    ("cbam-jax", ["eval", "--workdir", "empty_dir", "--batch-size", "0"], 2, "--batch-size"),
    ("cbam-jax", ["eval", "--pretrained", "model", "--config", "configs/nope.py"], 1, "configs/nope.py"),
    # export
    ("cbam-jax", ["export", "no_model", "artifacts"], 1, "no_model"),
    ("cbam-jax", ["export", "model", "existing_out"], 1, "existing_out"),
    ("cbam-jax", ["export", "model", "afile/artifacts"], 1, "afile"),
    ("cbam-jax", ["export", "model", "artifacts", "--formats", "tflite"], 1, "tflite"),
    ("cbam-jax", ["export", "model", "artifacts", "--height", "0", "--width", "8"], 1, "height=0"),
    ("cbam-jax", ["export", "nan_model", "artifacts"], 1, "--allow-nonfinite"),
    # convert (safetensors: no torch needed)
    ("cbam-jax", ["convert", "missing.safetensors", "converted"], 1, "missing.safetensors"),
    ("cbam-jax", ["convert", "garbage.safetensors", "converted"], 1, "garbage.safetensors"),
    ("cbam-jax", ["convert", "unknown_keys.safetensors", "converted"], 1, "encoder.weight"),
    ("cbam-jax", ["convert", "unknown_keys.safetensors", "existing_out"], 1, "existing_out"),
    ("cbam-jax", ["convert", "unknown_keys.safetensors", "afile/converted"], 1, "afile"),
    ("cbam-jax", ["convert", "unknown_keys.safetensors", "converted", "--class-names", "nope.txt"], 1, "nope.txt"),
    ("cbam-jax", ["convert", "nan_model", "nan.safetensors", "--to-torch"], 1, "--allow-nonfinite"),
    ("cbam-jax", ["convert", "model", "model.npz", "--to-torch"], 1, "model.npz"),
    # list-pretrained
    ("cbam-jax", ["list-pretrained", "zzz_no_such*"], 1, "zzz_no_such"),
    ("cbam-jax", ["list-pretrained", "--colour"], 2, "--colour"),
    # the ablation study
    ("ablation", ["--rows", "no_such_row"], 2, "no_such_row"),
    ("ablation", ["--quick", "--rows", "cbam", "--config.batchsize=3"], 2, "batchsize"),
    ("ablation", ["--seeds", "0"], 2, "--seeds"),
]


@pytest.mark.parametrize("entry_point, arguments, exit_code, mentions", CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}"[:80] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(inputs, entry_point, arguments, exit_code, mentions):
    for name in ("configs", "benchmarks"):  # recipes and the ablation module, as from the repository root
        if not (inputs / name).exists():
            (inputs / name).symlink_to(ROOT / name)
    before = snapshot(inputs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(ENTRY_POINTS[entry_point]() + arguments, cwd=inputs, env=env, capture_output=True,
                            text=True, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1, result.stderr
    assert mentions in lines[0]
    assert snapshot(inputs) == before  # nothing created, removed or changed
    assert not any(p.name.startswith(".") and "partial" in p.name for p in inputs.iterdir())



def test_command_line_errors_are_one_sentence():
    """argparse's own messages and our type checks' (which end in a full stop) both read as one
    sentence: '<message> (see `PROG -h`).', never '<message>. (see ...).'."""
    import argparse

    from cbam_jax.cli import ArgumentParser
    from cbam_jax.errors import UsageError

    def case(text: str) -> str:
        raise argparse.ArgumentTypeError(f"case must be MODEL:SIZE:BATCH; got {text!r}.")

    parser = ArgumentParser(prog="prog")
    parser.add_argument("--case", type=case)
    parser.add_argument("--steps", type=int, required=True)
    for argv, message in ((["--case", "x"], "argument --case: case must be MODEL:SIZE:BATCH; got 'x'"),
                          ([], "the following arguments are required: --steps")):
        with pytest.raises(UsageError) as raised:
            parser.parse_args(argv)
        assert str(raised.value) == f"{message} (see `prog -h`)."
