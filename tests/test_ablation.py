"""The ablation recipe (configs/ablation.py), config.model.attention_options and the study
(benchmarks/ablation.py): rows, tables, bad input, and (slow) a tiny study run, rerun and resumed."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import ablation
from tests.helpers import count_params
from cbam_jax import create_model
from cbam_jax.training.config import base_config, validate
from cbam_jax.training.trainer import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
recipe = ablation.load_recipe()


def _params(config):
    model = build_model(config)
    shape = (1, config.dataset.image_size, config.dataset.image_size, config.dataset.channels)
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]


# ----------------------------------------------------------------------------- the recipe


def test_rows_tables_and_paper_numbers_agree():
    assert set(recipe.ROWS) == set(ablation.PAPER)
    assert {row for rows in ablation.TABLES.values() for row in rows} == set(recipe.ROWS)


@pytest.mark.parametrize("row", list(recipe.ROWS))
def test_every_row_builds_the_design_it_names(row):
    config = recipe.get_config(row)
    assert config.is_locked and config.dataset.source == "digits"  # the default recipe underneath
    model, params = _params(config)
    block = params["layer1_0"]
    if row == "resnet":
        assert model.attention is None and "attention" not in block
        return
    assert model.attention == "cbam"
    options = model.attention_options
    attention = block["attention"]
    if row.startswith("channel_"):
        assert not options["use_spatial"] and "spatial" not in attention
        assert options["pool_types"] == {"avg": ("avg",), "max": ("max",), "avgmax": ("avg", "max")}[row[8:]]
        return
    assert options["pool_types"] == ("avg", "max")
    kernel = attention["spatial"]["conv"]["kernel"].shape
    assert kernel[0] == (3 if row.endswith("_k3") else 7)
    assert ("compress" in attention["spatial"]) == row.startswith("conv1x1") and kernel[2] == (1 if row.startswith("conv1x1") else 2)
    assert options["arrangement"] == (row if row in ("spatial_first", "parallel") else "channel_first")


def test_rows_on_another_base_recipe():
    config = recipe.get_config("conv1x1_k7,base=cifar10")
    assert (config.dataset.name, config.model.name, config.num_epochs) == ("cifar10", "cbam_resnet18", 200.0)
    assert config.model.attention_options.spatial_descriptor == "conv1x1"
    assert recipe.get_config("resnet,base=imagenet2012").model.name == "resnet50"


@pytest.mark.parametrize("argument, error, message", [
    ("nope", ValueError, "unknown row 'nope'; rows: resnet"),
    ("cbam,bass=tiny", ValueError, "'ROW' or 'ROW,base=RECIPE'"),
    ("cbam,base=nope", FileNotFoundError, "recipes: configs/"),
])
def test_bad_recipe_argument(argument, error, message):
    with pytest.raises(error, match=message):
        recipe.get_config(argument)


# ----------------------------------------------------------------------------- config.model.attention_options


def test_attention_options_reach_the_model():
    config = base_config()
    config.model.attention_options = {"arrangement": "parallel", "kernel_size": 3}
    model = build_model(validate(config))
    assert (model.attention_options["arrangement"], model.attention_options["kernel_size"]) == ("parallel", 3)
    assert model.attention_options["reduction"] == 16  # still from config.model.reduction


@pytest.mark.parametrize("options, message", [
    ({"arangement": "parallel"}, r"attention_options: Unknown option\(s\) \['arangement'\]"),
    ({"width": 32}, r"\['width'\] are model options"),
    ({"reduction": 4}, "config.model.reduction"),
])
def test_bad_attention_options_are_rejected(options, message):
    config = base_config()
    config.model.attention_options = options
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_plain_resnet_takes_no_attention_options():
    config = base_config()
    config.model.name = "resnet18"
    config.model.attention_options = {"kernel_size": 3}
    with pytest.raises(ValueError, match="Unknown option"):
        validate(config)


def test_config_saved_before_attention_options_still_loads():
    saved = json.loads(base_config().to_json())
    del saved["model"]["attention_options"]
    config = validate(ml_collections.ConfigDict(saved))
    assert config.model.attention_options.to_dict() == {}


# ----------------------------------------------------------------------------- the study: tables


def test_aggregate_and_markdown():
    def run(final, best, step_ms):
        return {"final_accuracy": final, "best_accuracy": best, "step_ms": step_ms, "parameters": 1234}

    results = {"cbam": [run(0.90, 0.95, 10.0), run(0.92, 0.97, 12.0), run(0.94, 0.96, 14.0)],
               "parallel": [run(0.80, 0.81, 20.0)], "spatial_first": [], "conv1x1_k3": [run(0.5, 0.5, None)]}
    stats = ablation.aggregate(results)
    assert set(stats) == {"cbam", "parallel", "conv1x1_k3"}  # rows without a finished run are left out
    np.testing.assert_allclose(stats["cbam"]["final"], (92.0, 2.0))  # sample standard deviation
    np.testing.assert_allclose(stats["cbam"]["best"], (96.0, 1.0))
    assert stats["cbam"]["step_ms"] == pytest.approx(12.0) and stats["parallel"]["final"] == (80.0, 0.0)
    table = ablation.markdown(stats, "title")
    assert "Table 1" not in table  # no row of it ran
    assert table.count("| `cbam` |") == 2  # Table 2 and Table 3
    assert "| `cbam` | CBAM: channel, then spatial (pool, k=7) | 1,234 | 92.00 ± 2.00 | 96.00 ± 1.00 | 12.0 | 3 | 22.66 / 6.31 |" in table
    assert "| `parallel` | channel and spatial in parallel | 1,234 | 80.00 ± 0.00 |" in table
    assert "| 50.00 ± 0.00 | 50.00 ± 0.00 | - | 1 |" in table  # no step time: a run resumed after its last step


def test_findings_name_the_range_of_the_attention_rows_and_of_the_spread():
    stats = {"resnet": {"final": (96.0, 0.5)}, "cbam": {"final": (98.5, 0.25)}, "parallel": {"final": (95.5, 1.5)},
             "pool_k3": {"final": (97.0, 0.75)}}
    assert ablation.findings(stats) == (
        "Final accuracy, mean ± standard deviation over the seeds: `resnet` 96.00 ± 0.50%; the attention rows from "
        "95.50% (`parallel`) to 98.50% (`cbam`), -0.50 to +2.50 points against `resnet`; the rows' standard "
        "deviations 0.25 to 1.50 points.")
    assert ablation.findings({"resnet": {"final": (96.0, 0.5)}}) == ""  # nothing to compare


def test_timing_sums_the_runs_that_recorded_their_time():
    report = {"runs": {"cbam": [{"wall_seconds": 30.0}, {"wall_seconds": 60.0}], "resnet": [{}]},
              "load_before": [1.25, 1.0, 1.0], "load_after": [2.0, 1.5, 1.0], "trained_now": 1}
    assert ablation.timing(report) == ("2 runs, one after another, took 1.5 min (compilation and evaluation included); "
                                       "the 1-minute load average was 1.2 before the study and 2.0 after it.")
    report["trained_now"] = 0  # an invocation that read finished runs only: its load says nothing about them
    assert ablation.timing(report) == "2 runs, one after another, took 1.5 min (compilation and evaluation included)."
    assert ablation.timing({"runs": {"cbam": [{}]}}) == ""  # runs of an older study: no time recorded


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")  # the optional "bench" extra; installed with "test"
    stats = {row: {"final": (90.0 + i, 1.0), "best": (95.0, 0.5), "step_ms": 1.0, "parameters": 1, "seeds": 2}
             for i, row in enumerate(recipe.ROWS)}
    ablation.plot(stats, str(tmp_path / "plot.png"), "title; machine")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the study: bad input


@pytest.mark.parametrize("arguments, message", [
    (["--rows", "nope"], "unknown row(s) ['nope']"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--base", "nope"], "--base 'nope' is not a recipe in configs/"),
    (["--config.batchsize=8"], "no field 'batchsize' to override; did you mean 'batch_size'?"),
    (["--config.batch_size=abc"], "invalid literal for int()"),
    (["--config.seed=3"], "use --seeds N"),
    (["--json", ""], "--json '' is not a file name"),
    (["--rows", "resnet", "--seeds", "1", "--json", os.path.join(ROOT, "README.md", "report.json")], "is a file, not a folder"),
    (["--rows", "resnet", "--config.model.attention_options.kernel_size=3"], "no field 'kernel_size'"),
    (["--rows", "cbam", "--config.model.attention_options.kernel_size=4"], "kernel_size must be an odd"),
    (["--rows", "resnet", "--seeds", "1", "--config.dataset.source=folder", "--config.dataset.data_dir=/nonexistent"],
     "does not exist"),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys, arguments, message):
    study = tmp_path / "study"
    assert ablation.main(["--study-dir", str(study), *arguments]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m benchmarks.ablation: error: ") and message in err
    assert not study.exists()


def test_a_study_folder_of_other_settings_is_refused(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"base": "tiny", "overrides": []}))
    assert ablation.main(["--study-dir", str(study), "--rows", "resnet", "--seeds", "1"]) == 2
    assert "holds a study with other settings" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert ablation.main(["--study-dir", str(other), "--rows", "resnet", "--seeds", "1"]) == 2
    assert "is not an ablation study folder" in capsys.readouterr().err
    assert os.listdir(other) == ["notes.txt"]


def test_without_matplotlib_the_table_still_comes(monkeypatch, tmp_path, capsys):
    """The plot is optional: no matplotlib, a note instead of results.png (with a fake run)."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    # step_ms None: a run that had finished before its result.json was written trains no step now
    run = {"final_accuracy": 0.5, "best_accuracy": 0.6, "step_ms": None, "parameters": 10, "best_step": 1, "steps": 1}
    monkeypatch.setattr(ablation, "train_run", lambda config, workdir, parameters: run)
    assert ablation.main(["--study-dir", str(tmp_path / "s"), "--rows", "resnet", "--seeds", "1"]) == 0
    captured = capsys.readouterr()
    assert "| `resnet` | ResNet, no attention | 10 | 50.00 ± 0.00 | 60.00 ± 0.00 | - | 1 |" in captured.out
    assert "no plot: matplotlib is not installed" in captured.err
    assert sorted(os.listdir(tmp_path / "s")) == ["results.json", "results.md", "study.json"]


def test_the_report_names_the_machine_and_the_command_and_goes_to_json_too(monkeypatch, tmp_path, capsys):
    run = {"final_accuracy": 0.5, "best_accuracy": 0.6, "step_ms": 2.0, "parameters": 10, "best_step": 1, "steps": 1}
    monkeypatch.setattr(ablation, "train_run", lambda config, workdir, parameters: run)
    arguments = ["--study-dir", str(tmp_path / "s"), "--rows", "resnet", "cbam", "--seeds", "2", "--no-plot",
                 "--json", str(tmp_path / "record" / "ablation.json")]
    assert ablation.main(arguments) == 0
    out = capsys.readouterr().out
    written = (tmp_path / "record" / "ablation.json").read_text()
    assert written == (tmp_path / "s" / "results.json").read_text()
    report = json.loads(written)
    assert report["command"] == "python -m benchmarks.ablation " + " ".join(arguments)
    assert report["machine"]["cpu"] and set(report["machine"]["cpu_shown_flags"]) <= set(report["machine"]["cpu_flags"])
    assert report["machine"]["jax"] == jax.__version__ and report["trained_now"] == 4 and report["seeds"] == 2
    # what the page renders from the report is what the command printed
    assert ablation.markdown(report["rows"], report["title"]) in out and ablation.findings(report["rows"]) in out
    assert report["machine"]["cpu"] in report["title"]


# ----------------------------------------------------------------------------- the study: a tiny run


@pytest.mark.slow
def test_tiny_study_runs_skips_finished_runs_and_resumes_an_interrupted_one(tmp_path):
    study = tmp_path / "study"
    tiny = ["--base", "tiny", "--seeds", "1", "--config.num_train_steps=4", "--config.eval_every_steps=2",
            "--config.checkpoint_every_steps=2", "--no-plot", "--study-dir", str(study)]

    def run_study(rows):
        return subprocess.run([sys.executable, "-m", "benchmarks.ablation", "--rows", *rows, *tiny], cwd=ROOT,
                              capture_output=True, text=True, timeout=900)

    # An interrupted run: train.py stopped the parallel row at step 2 in the study's workdir, with the
    # study's settings (what a Ctrl-C after the step-2 checkpoint leaves).
    workdir = study / "parallel" / "seed0"
    stopped = subprocess.run([sys.executable, "train.py", "--config", "configs/ablation.py:parallel,base=tiny",
                              "--workdir", str(workdir), "--config.num_train_steps=4", "--config.eval_every_steps=2",
                              "--config.checkpoint_every_steps=2", "--config.seed=0",
                              "--config.progress_bar=False", "--config.stop_at_step=2"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    (study / "study.json").write_text(json.dumps({"base": "tiny", "overrides": tiny[4:7]}))

    first = run_study(["resnet", "parallel"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "| `resnet` | ResNet, no attention |" in first.stdout and "| `parallel` |" in first.stdout
    summaries = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["split"] == "summary"]
    assert [(s["status"], s["step"]) for s in summaries] == [("stopped", 2), ("finished", 4)]  # resumed at step 2
    result = json.loads((workdir / "result.json").read_text())
    assert result["steps"] == 4 and result["attention_options"]["arrangement"] == "parallel"
    tiny_model = dict(num_classes=10, stem="cifar", width=8)  # configs/tiny.py
    assert result["parameters"] == count_params(create_model("cbam_resnet18", reduction=4, **tiny_model), (1, 8, 8, 1))
    resnet = json.loads((study / "resnet" / "seed0" / "result.json").read_text())
    assert resnet["parameters"] == count_params(create_model("resnet18", **tiny_model), (1, 8, 8, 1))

    metrics_before = {p: p.read_text() for p in study.glob("*/seed0/metrics.jsonl")}
    second = run_study(["resnet", "parallel"])  # everything finished: nothing trains again
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout == first.stdout
    assert {p: p.read_text() for p in study.glob("*/seed0/metrics.jsonl")} == metrics_before
    report = json.loads((study / "results.json").read_text())
    assert set(report["rows"]) == {"resnet", "parallel"} and len(report["runs"]["parallel"]) == 1
