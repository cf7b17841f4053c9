"""Detection training through train.py's machinery: a few-step smoke run with exact resume, the
export and `cbam-jax detect` on it, user mistakes as one line, and (slow) the offline end-to-end
run reaching a stated mAP@.5."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from cbam_jax import cli
from cbam_jax.detection.config import base_config, validate
from cbam_jax.detection.data import ShapesDataset
from cbam_jax.detection.train import train_and_evaluate
from cbam_jax.detection.weights import load_detector
from cbam_jax.errors import InvalidInput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(cache_dir, **changes):
    config = base_config()
    config.model.name = "resnet18"  # the pipeline, not the attention (tests/test_detection.py builds CBAM ones)
    config.dataset.image_size = 32
    config.dataset.num_train_images = 16
    config.dataset.num_eval_images = 4
    config.dataset.min_object_size, config.dataset.max_object_size = 6, 16
    config.batch_size, config.eval_batch_size = 4, 4
    config.num_train_steps = 4
    config.log_every_steps = 1
    config.detection.pre_nms_top_k, config.detection.max_detections = 20, 10
    config.tensorboard = False
    config.compilation_cache_dir = str(cache_dir)  # the resumed run reuses the first run's programs
    for field, value in changes.items():
        setattr(config, field, value)
    return config


def test_smoke_run_resumes_exactly_and_detect_reads_it(tmp_path, capsys):
    cache = tmp_path / "xla"
    straight = train_and_evaluate(tiny_config(cache), str(tmp_path / "straight"))
    assert straight["status"] == "finished" and straight["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert len(evals) == 1 and set(evals[0]) >= {"mAP", "mAP50", "mAP75", "mAP_small"}
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]

    stopped = train_and_evaluate(tiny_config(cache, stop_at_step=2), str(tmp_path / "resumed"))
    assert stopped["status"] == "stopped" and not (tmp_path / "resumed" / "detector").exists()
    resumed = train_and_evaluate(tiny_config(cache), str(tmp_path / "resumed"))
    assert resumed["status"] == "finished"
    _, a, _ = load_detector(tmp_path / "straight")
    _, b, _ = load_detector(tmp_path / "resumed")
    jax.tree.map(np.testing.assert_array_equal, a, b)  # the same batches and updates, bit for bit
    assert resumed["final"] == straight["final"]

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(ShapesDataset(1, 48, split="test")[0]["image"]).save(images / "a.png")
    (images / "notes.txt").write_text("not an image")
    code = cli.main(["detect", str(images), "--pretrained", str(tmp_path / "straight"), "--json",
                     "--out", str(tmp_path / "drawn"), "--score-threshold", "0.0"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["image"].endswith("a.png") and len(result["detections"]) == 10
    for row in result["detections"]:
        assert 0 <= row["box"][0] <= row["box"][2] <= 48 and row["class"] in ("rectangle", "ellipse", "triangle")
    assert (tmp_path / "drawn" / "a_detections.png").is_file()


def test_init_from_pretrained_backbone_with_frozen_stem(tmp_path):
    """The backbone starts from a pretrained folder (init_from); the frozen stem keeps those values."""
    import jax.numpy as jnp

    from cbam_jax.pretrained import save_pretrained
    from cbam_jax.registry import create_model

    source = create_model("resnet18", num_classes=5, width=8)
    variables = source.init(jax.random.key(7), jnp.zeros((1, 32, 32, 3)))
    save_pretrained(tmp_path / "source", source, variables)
    config = tiny_config(tmp_path / "xla", num_train_steps=2, init_from=str(tmp_path / "source"),
                         freeze="backbone/conv1,backbone/bn1")
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    _, trained, _ = load_detector(summary["pretrained"])
    np.testing.assert_array_equal(trained["params"]["backbone"]["conv1"]["kernel"], variables["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(trained["batch_stats"]["backbone"]["bn1"]["mean"],
                                  variables["batch_stats"]["bn1"]["mean"])
    moved = trained["params"]["backbone"]["layer1_0"]["conv1"]["kernel"]
    assert not np.array_equal(moved, variables["params"]["layer1_0"]["conv1"]["kernel"])  # trained from the source
    assert np.abs(moved - variables["params"]["layer1_0"]["conv1"]["kernel"]).max() < 0.05  # ... not re-initialised
    config = tiny_config(tmp_path / "xla", init_from=str(tmp_path / "nowhere"))
    with pytest.raises(InvalidInput, match="config.init_from"):
        validate(config)


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
