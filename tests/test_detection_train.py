"""Detection training through train.py's machinery: one tiny run shared by the tests (module fixture)
that resume it exactly (jit, pmap), stop it with SIGTERM, evaluate it (`cbam-jax eval`), export it
(`cbam-jax export`) and read it (`cbam-jax detect`); mixed precision; user mistakes as one line;
and the offline end-to-end run reaching a stated mAP@.5. Every run compiles: they are slow-marked."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cbam_jax import cli
from cbam_jax.detection.config import base_config, validate
from cbam_jax.detection.data import ShapesDataset
from cbam_jax.detection.evaluate import predict
from cbam_jax.detection.train import train_and_evaluate
from cbam_jax.detection.weights import load_detector
from cbam_jax.errors import InvalidInput
from cbam_jax.images import normalize
from cbam_jax.training.checkpoint import restore_variables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**changes):
    """The cheapest detector run that goes through every part: a width-8 ResNet-18 FCOS with one
    8-channel tower conv on 32 x 32 images, 3 steps of batch 2, a checkpoint after each step."""
    config = base_config()
    config.model.name = "resnet18"  # the pipeline, not the attention (tests/test_detection.py builds CBAM ones)
    config.dataset.image_size = 32
    config.dataset.num_train_images = 8
    config.dataset.num_eval_images = 2
    config.dataset.min_object_size, config.dataset.max_object_size = 6, 16
    config.batch_size, config.eval_batch_size = 2, 2
    config.num_train_steps = 3
    config.log_every_steps = 1
    config.checkpoint_every_steps, config.keep_checkpoints = 1, 3
    config.detection.fpn_channels, config.detection.head_convs, config.detection.head_norm_groups = 8, 1, 4
    config.detection.pre_nms_top_k, config.detection.max_detections = 10, 5
    config.tensorboard = False
    config.compilation_cache_dir = ""  # the test session's cache (tests/conftest.py): runs share their programs
    for field, value in changes.items():
        setattr(config, field, value)
    return config


def crashed_copy(workdir, destination, after_step: int):
    """A copy of a run's workdir as a crash after the checkpoint of `after_step` would leave it: the
    later checkpoints and the export are gone (the best one is discarded when the run resumes)."""
    shutil.copytree(workdir, destination)
    for step in os.listdir(destination / "checkpoints"):
        if int(step) > after_step:
            shutil.rmtree(destination / "checkpoints" / step)
    shutil.rmtree(destination / "detector", ignore_errors=True)
    return destination


def assert_same_detector(a, b):
    jax.tree.map(np.testing.assert_array_equal, load_detector(a)[1], load_detector(b)[1])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One finished run (jit, float32) that the tests below resume, evaluate, export and read."""
    workdir = tmp_path_factory.mktemp("detection") / "straight"
    summary = train_and_evaluate(tiny_config(), str(workdir))
    assert summary["status"] == "finished" and summary["step"] == 3
    return workdir, summary


@pytest.mark.slow
def test_a_run_logs_evaluates_and_resumes_exactly_after_a_crash(straight, tmp_path):
    workdir, summary = straight
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and set(evals[0]) >= {"mAP", "mAP50", "mAP75", "mAP_small"}
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3]
    resumed = train_and_evaluate(tiny_config(), str(crashed_copy(workdir, tmp_path / "resumed", after_step=1)))
    assert resumed["status"] == "finished" and resumed["final"] == summary["final"]
    assert_same_detector(workdir, tmp_path / "resumed")  # the same batches and updates, bit for bit


@pytest.mark.slow
def test_pmap_resumes_a_jit_checkpoint_and_takes_the_same_steps(straight, tmp_path):
    """parallel='pmap' (a free field: a run may change modes on resume): the per-device step, its
    device-mean loss normalisers and BatchNorm axis give the jit step's parameters."""
    workdir, summary = straight
    resumed = train_and_evaluate(tiny_config(parallel="pmap"),
                                 str(crashed_copy(workdir, tmp_path / "pmap", after_step=1)))
    assert resumed["status"] == "finished"
    # Not bit for bit (another program, other reduction orders), and AdamW divides by the gradients'
    # scale, so a near-zero gradient's rounding can move its parameter by up to a step. Compared: the
    # losses of the two steps, and the distance of the parameters relative to how far the steps moved them.
    def losses(run):
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records if r["split"] == "train" and r["step"] > 1}

    np.testing.assert_allclose(list(losses(tmp_path / "pmap").values()), list(losses(workdir).values()), rtol=1e-5)
    flat = [np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(params)]) for params in (
        restore_variables(workdir, step=1)[0]["params"], load_detector(workdir)[1]["params"],
        load_detector(tmp_path / "pmap")[1]["params"])]
    start, jit_end, pmap_end = flat
    assert np.linalg.norm(pmap_end - jit_end) < 1e-2 * np.linalg.norm(jit_end - start)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_mixed_precision_runs_resume_exactly(precision, tmp_path):
    """bfloat16 compute, and float16 with dynamic loss scaling (its scale is part of the checkpoint).
    The runs stop at step 3 of 4 (no evaluation: the eval path does not depend on the precision):
    step 1 has learning rate 0 (warm-up), and a float16 step whose gradients overflow at the initial
    scale 2^15 is skipped with the scale halved (step 2 on some CPUs), so two steps are needed to train."""
    config = tiny_config(precision=precision, num_train_steps=4, stop_at_step=3)
    assert train_and_evaluate(config, str(tmp_path / "straight"))["status"] == "stopped"
    resumed = train_and_evaluate(config, str(crashed_copy(tmp_path / "straight", tmp_path / "resumed", after_step=1)))
    assert resumed["status"] == "stopped" and resumed["step"] == 3
    straight_state, resumed_state = (restore_variables(tmp_path / run, "latest")[0] for run in ("straight", "resumed"))
    jax.tree.map(np.testing.assert_array_equal, straight_state, resumed_state)
    start = restore_variables(tmp_path / "straight", step=1)[0]
    assert not np.array_equal(start["params"]["head"]["class_logits"]["kernel"],
                              resumed_state["params"]["head"]["class_logits"]["kernel"])  # it did train

    def train_records(run):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r.get("loss_scale")) for r in records if r["split"] == "train"]

    straight_train, resumed_train = train_records("straight"), train_records("resumed")
    assert [step for step, _, _ in resumed_train] == [1, 2, 3, 2, 3] and resumed_train[:3] == straight_train
    assert resumed_train[3:] == straight_train[1:]  # the resumed steps' losses and loss scales, exactly
    assert all(math.isfinite(loss) for _, loss, _ in resumed_train)
    scales = [scale for _, _, scale in straight_train]
    if precision == "float16":
        assert scales[0] == 2.0 ** 15 and set(scales) <= {2.0 ** 15, 2.0 ** 14}
    else:
        assert scales == [None] * 3


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops_cleanly(straight, tmp_path, monkeypatch):
    """SIGTERM (a preempted machine) during the first resumed step: the step ends, its checkpoint is
    saved (the straight run's state at that step) and the run says 'preempted'."""
    from cbam_jax.training import parallel

    workdir, summary = straight
    copy = crashed_copy(workdir, tmp_path / "preempted", after_step=1)
    real_next = parallel.DevicePrefetch.__next__

    def next_then_sigterm(self):
        batch = real_next(self)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives before the step ends: the handler only sets a flag
        return batch

    monkeypatch.setattr(parallel.DevicePrefetch, "__next__", next_then_sigterm)
    stopped = train_and_evaluate(tiny_config(), str(copy))
    assert stopped["status"] == "preempted" and stopped["step"] == 2
    assert sorted(os.listdir(copy / "checkpoints")) == ["1", "2"] and not (copy / "detector").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    jax.tree.map(np.testing.assert_array_equal, restore_variables(copy, "latest")[0],
                 restore_variables(workdir, step=2)[0])


@pytest.mark.slow
def test_eval_export_and_detect_read_a_finished_run(straight, tmp_path, capsys):
    workdir, summary = straight
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["step"] == 3 and figures["examples"] == 2
    assert {k: figures[k] for k in summary["final"]} == summary["final"]  # the run's own figures, again

    assert cli.main(["export", str(workdir), str(tmp_path / "artifact")]) == 0
    assert "decoded detections after NMS (StableHLO) / dense outputs (ONNX)" in capsys.readouterr().out
    document = json.loads((tmp_path / "artifact" / "artifact.json").read_text())
    assert document["task"] == "detection" and document["files"] == {"stablehlo": "model.jax_export",
                                                                      "onnx": "model.onnx"}
    detector, variables, metadata = load_detector(workdir)
    images = ShapesDataset(3, 32, split="test")
    batch = np.stack([images[i]["image"] for i in range(3)])
    exported = jax.export.deserialize(bytearray((tmp_path / "artifact" / "model.jax_export").read_bytes()))
    found = exported.call(normalize(batch, metadata["preprocessing"]["mean"], metadata["preprocessing"]["std"]))
    expected = predict(variables, batch, detector=detector, mean=tuple(metadata["preprocessing"]["mean"]),
                       std=tuple(metadata["preprocessing"]["std"]), decoding=metadata["decoding"])
    np.testing.assert_array_equal(found["valid"], expected.valid)
    np.testing.assert_allclose(found["boxes"], expected.boxes, rtol=1e-5, atol=1e-4)

    images_dir = tmp_path / "images"
    images_dir.mkdir()
    Image.fromarray(ShapesDataset(1, 48, split="test")[0]["image"]).save(images_dir / "a.png")
    (images_dir / "notes.txt").write_text("not an image")
    code = cli.main(["detect", str(images_dir), "--pretrained", str(workdir), "--json",
                     "--out", str(tmp_path / "drawn"), "--score-threshold", "0.0"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["image"].endswith("a.png") and len(result["detections"]) == 5
    for row in result["detections"]:
        assert 0 <= row["box"][0] <= row["box"][2] <= 48 and row["class"] in ("rectangle", "ellipse", "triangle")
    assert (tmp_path / "drawn" / "a_detections.png").is_file()


@pytest.mark.slow
def test_init_from_pretrained_backbone_with_frozen_stem(tmp_path):
    """The backbone starts from a pretrained folder (init_from); the frozen stem keeps those values."""
    from cbam_jax.pretrained import save_pretrained
    from cbam_jax.registry import create_model
    from tests.helpers import randomize

    source = create_model("resnet18", num_classes=5, width=8)
    variables = randomize(jax.eval_shape(source.init, jax.random.key(7), jnp.zeros((1, 32, 32, 3))))
    save_pretrained(tmp_path / "source", source, variables)
    config = tiny_config(stop_at_step=2, init_from=str(tmp_path / "source"), freeze="backbone/conv1,backbone/bn1")
    assert train_and_evaluate(config, str(tmp_path / "run"))["status"] == "stopped"
    trained, _ = restore_variables(tmp_path / "run", "latest")
    np.testing.assert_array_equal(trained["params"]["backbone"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(trained["batch_stats"]["backbone"]["bn1"]["mean"],
                                  variables["batch_stats"]["bn1"]["mean"])
    moved = trained["params"]["backbone"]["layer1_0"]["conv1"]["kernel"]
    assert not np.array_equal(moved, variables["params"]["layer1_0"]["conv1"]["kernel"])  # trained from the source
    assert np.abs(moved - variables["params"]["layer1_0"]["conv1"]["kernel"]).max() < 0.05  # ... not re-initialised


def test_a_second_run_on_a_workdir_stops_at_once_naming_the_first(tmp_path):
    """As classification's: the workdir's lock, held here as a first run would, stops a second run
    before it reads or writes anything."""
    from cbam_jax.errors import OutputError
    from cbam_jax.training.checkpoint import LOCK_FILE, lock_workdir

    workdir = tmp_path / "run"
    first = lock_workdir(str(workdir))
    try:
        with pytest.raises(OutputError, match=rf"in use by another training run \(process {os.getpid()}\)"):
            train_and_evaluate(tiny_config(), str(workdir))
        assert os.listdir(workdir) == [LOCK_FILE]
    finally:
        first.close()


def test_init_from_a_missing_source_names_the_field(tmp_path):
    with pytest.raises(InvalidInput, match="config.init_from"):
        validate(tiny_config(init_from=str(tmp_path / "nowhere")))


def test_detector_folders_with_a_corrupt_config_are_reported_as_corrupt(tmp_path, capsys):
    for folder in (tmp_path / "run" / "detector", tmp_path / "folder"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"detector": {')
        (folder / "model.safetensors").write_bytes(b"")
    for command in (["export", str(tmp_path / "run"), str(tmp_path / "out")],
                    ["export", str(tmp_path / "folder"), str(tmp_path / "out")],
                    ["detect", str(tmp_path / "a.png"), "--pretrained", str(tmp_path / "run")]):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
        assert cli.main(command) != 0
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "corrupt" in error and "Unknown config" not in error, error
    assert not (tmp_path / "out").exists()


def test_detect_user_mistakes_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["detect", str(tmp_path / "empty"), "--pretrained", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "holds no images" in error
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert cli.main(["detect", str(image), "--pretrained", str(tmp_path / "missing")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no such file or directory" in error
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_field():
    config = base_config()
    config.dataset.num_classes = 0
    with pytest.raises(InvalidInput, match=r"config.dataset.num_classes must be > 0"):
        validate(config)
    config = base_config()
    config.detection.head_norm_groups = 5
    with pytest.raises(InvalidInput, match="head_norm_groups"):
        validate(config)
    for recipe in ("detection_shapes", "detection_voc07", "detection_coco17"):
        module = {}
        exec(open(os.path.join(ROOT, "configs", f"{recipe}.py")).read(), module)
        assert module["get_config"]().task == "detection"


@pytest.mark.slow  # a train.py subprocess (imports jax and the training stack)
def test_train_py_detection_mistake_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config",
                             os.path.join(ROOT, "configs", "detection_shapes.py"), "--config.model.name=resnet7",
                             "--workdir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "resnet7" in result.stderr
    assert not (tmp_path / "run").exists()


# configs/detection_shapes.py, CBAM-ResNet-18 backbone: the test trains seed 0, whose recorded mAP@.5
# (benchmarks/results/detection_seeds.json, quoted by docs/detection.md) tests/test_docs.py checks against this.
E2E_MIN_MAP50 = 0.5


@pytest.mark.slow
def test_end_to_end_on_shapes_reaches_stated_map50(tmp_path):
    module = {}
    exec(open(os.path.join(ROOT, "configs", "detection_shapes.py")).read(), module)
    config = module["get_config"]()
    config.unlock()
    config.tensorboard = False
    config.compilation_cache_dir = ""
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["final"]["mAP50"] >= E2E_MIN_MAP50, summary["final"]


TWO_DEVICES = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from tests.test_detection_train import tiny_config
from cbam_jax.detection.train import train_and_evaluate
from cbam_jax.detection.weights import load_detector
from cbam_jax.training.checkpoint import restore_variables

root = sys.argv[1]
losses, params = {}, {}
for mode in ("jit", "pmap"):
    # SGD: its update is linear in the gradient (AdamW's division by the gradient's scale turns
    # the rounding of near-zero gradients into whole steps, which would hide a real difference).
    workdir = f"{root}/{mode}"
    train_and_evaluate(tiny_config(parallel=mode, optimizer="sgd", batch_size=4, num_train_steps=2), workdir)
    records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    losses[mode] = [r["loss"] for r in records if r["split"] == "train"]
    params[mode] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(load_detector(workdir)[1]["params"])])
start = np.concatenate([np.ravel(x) for x in jax.tree.leaves(restore_variables(f"{root}/jit", step=1)[0]["params"])])
print(json.dumps({"losses": losses, "distance": float(np.linalg.norm(params["pmap"] - params["jit"])),
                  "step": float(np.linalg.norm(params["jit"] - start))}))
"""


@pytest.mark.slow
def test_jit_and_pmap_on_two_devices_take_the_same_steps(tmp_path):
    """Two CPU devices (a subprocess, so this process keeps one), batch 4 split 2 + 2: the sharded jit
    step and the per-device pmap step (global BatchNorm statistics, the batch's positives counted over
    both devices) give the same losses and parameters, to float rounding."""
    result = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["losses"]["jit"]) == 2
    np.testing.assert_allclose(report["losses"]["pmap"], report["losses"]["jit"], rtol=1e-5)
    assert report["distance"] < 1e-3 * report["step"]
