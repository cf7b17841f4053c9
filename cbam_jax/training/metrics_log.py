"""What a run shows and records: the window of train-step metrics since the last log line
(`MetricWindow`), and `MetricLog`: JSON lines (`workdir/metrics.jsonl`), TensorBoard events
(`workdir/tensorboard/`) and the progress bar, written by process 0 only."""

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from cbam_jax.errors import require


class MetricWindow:
    """The train-step metrics since the last `flush`, and the training time and images so far.

    Step metrics (device sums: loss_sum, correct, count, loss_scale) stay unfetched until `flush`,
    so that the host does not wait for every step. Time outside training (the first, compiling
    step; evaluation, under `paused()`) does not count towards images/s.
    """

    def __init__(self, metrics_to_host: Callable[[Any], dict], learning_rate: Callable[[int], Any],
                 loss_scaled: bool = False):
        self._to_host = metrics_to_host
        self._learning_rate = learning_rate
        self._loss_scaled = loss_scaled
        self._pending: list[Any] = []
        self._images = 0
        self._start = time.perf_counter()
        self.train_seconds = 0.0
        self.train_images = 0

    def add(self, metrics: Any, images: int) -> None:
        """One step's metrics (still on the device) and the images it trained on."""
        self._pending.append(metrics)
        self._images += images

    def exclude_first_step(self, metrics: Any) -> float:
        """Wait for the first step, keep its metrics but not its time; returns its seconds
        (mostly compilation)."""
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - self._start
        self._start = time.perf_counter()
        self.add(metrics, images=0)
        return seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count as training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - start

    def flush(self, step: int) -> dict | None:
        """Fetch the pending metrics and start a new window.

        Returns:
          None if no step is pending, else {'loss', 'accuracy', 'learning_rate' (of `step`),
          'images_per_second'} (+ 'loss_scale' under float16 loss scaling); the loss may be NaN/inf.
        """
        if not self._pending:
            return None
        sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for metrics in self._pending:
            host = self._to_host(metrics)
            for key in sums:
                sums[key] += host[key]
        elapsed = time.perf_counter() - self._start
        self.train_seconds += elapsed
        self.train_images += self._images
        record = {"loss": sums["loss_sum"] / sums["count"], "accuracy": sums["correct"] / sums["count"],
                  "learning_rate": float(self._learning_rate(step - 1)),
                  "images_per_second": self._images / max(elapsed, 1e-9)}
        if self._loss_scaled:
            record["loss_scale"] = host["loss_scale"]  # the scale of the last step
        self._pending, self._images, self._start = [], 0, time.perf_counter()
        return record


class MetricLog:
    """Append-only metric records {'step', 'split', name: value, ...}, and the progress bar."""

    def __init__(self, workdir: str, tensorboard: bool, *, progress_bar: bool = False, total_steps: int = 0,
                 start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled and tensorboard:
            self.tb = require("tensorboardX", "train").SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.bar = None
        if self.enabled and progress_bar:
            self.bar = require("tqdm", "train").tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def advance(self) -> None:
        """One more step done (the progress bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{split}/{name}", value, step)
        if self.bar is not None and split == "train":
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['accuracy']:.3f}",
                                 lr=f"{values['learning_rate']:.3g}", img_s=f"{values['images_per_second']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
