"""Metrics of a run: JSON lines (`workdir/metrics.jsonl`) and TensorBoard events (`workdir/tensorboard/`),
written by process 0 only."""

import json
import os
import warnings

import jax


class MetricLog:
    """Append-only metric records {'step', 'split', name: value, ...}."""

    def __init__(self, workdir: str, tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb = None
        if self.enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                warnings.warn("config.tensorboard=True but tensorboardX is not installed (pip install tensorboardX); "
                              "writing JSON lines only.")

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "split": split, **values}) + "\n")
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
