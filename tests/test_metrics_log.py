"""The metric window of the training loop: averages over the steps since the last log line, and
images/s that leave out the compiling first step and evaluation."""

import json
import time

import pytest

from cbam_jax.training.metrics_log import MetricLog, MetricWindow


def step_metrics(loss_sum, correct, count, loss_scale=1.0):
    return {"loss_sum": loss_sum, "correct": correct, "count": count, "loss_scale": loss_scale}


def test_window_averages_the_pending_steps_and_starts_afresh():
    window = MetricWindow(dict, learning_rate=lambda step: 0.1 * step, loss_scaled=True)
    assert window.flush(step=1) is None  # nothing pending
    window.add(step_metrics(4.0, 3.0, 4.0, loss_scale=8.0), images=4)
    window.add(step_metrics(2.0, 1.0, 4.0, loss_scale=16.0), images=4)
    record = window.flush(step=5)
    assert record["loss"] == pytest.approx(6.0 / 8.0) and record["accuracy"] == pytest.approx(4.0 / 8.0)
    assert record["learning_rate"] == pytest.approx(0.4)  # the rate the last step (index 4) used
    assert record["loss_scale"] == 16.0 and record["images_per_second"] > 0
    assert window.train_images == 8 and window.flush(step=6) is None
    unscaled = MetricWindow(dict, learning_rate=lambda step: 0.0)
    unscaled.add(step_metrics(1.0, 1.0, 1.0), images=1)
    assert "loss_scale" not in unscaled.flush(step=1)


def test_first_step_and_pauses_are_not_training_time():
    window = MetricWindow(dict, learning_rate=lambda step: 0.0)
    time.sleep(0.2)  # "compiling"
    first_seconds = window.exclude_first_step(step_metrics(1.0, 1.0, 2.0))
    assert first_seconds >= 0.2
    with window.paused():
        time.sleep(0.2)  # "evaluating"
    window.add(step_metrics(1.0, 1.0, 2.0), images=2)
    record = window.flush(step=2)
    assert record["loss"] == pytest.approx(0.5)  # the first step's metrics count
    assert window.train_images == 2  # but not its images
    assert window.train_seconds < 0.15  # neither its time nor the pause


def test_log_writes_json_lines(tmp_path):
    log = MetricLog(str(tmp_path), tensorboard=False)
    log.write(3, "train", {"loss": 0.5, "accuracy": 0.25, "learning_rate": 0.1, "images_per_second": 10.0})
    log.advance()  # no progress bar asked: nothing to do
    log.close()
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert records == [{"step": 3, "split": "train", "loss": 0.5, "accuracy": 0.25, "learning_rate": 0.1,
                        "images_per_second": 10.0}]
