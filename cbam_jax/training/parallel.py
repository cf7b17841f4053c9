"""Data parallelism: the same step functions placed with `jax.jit` over a Mesh, or with `jax.pmap`.

- 'jit': a 1-D Mesh named 'data' over all devices of all processes; the global batch is sharded
  along it, the state replicated and donated; BatchNorm statistics are global because the batch is.
- 'pmap': one program per local device on axis 'batch' (the Flax ImageNet example's layout); the
  model's BatchNorms get `bn_axis_name='batch'` and the step averages over the axis.

The state always leaves and enters as host numpy (`to_host` / `place_state`), so checkpoints do not
depend on the mode or the device count.
"""

import functools
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from cbam_jax.training import step as step_lib

PMAP_AXIS = "batch"


class DataParallel:
    """Compiled train/eval steps of one mode plus the matching placement of state and batches."""

    def __init__(self, mode: str, model: nn.Module, tx, *, num_classes: int, label_smoothing: float,
                 mean: tuple, std: tuple, dynamic_loss_scale: bool):
        if mode not in ("jit", "pmap"):
            raise ValueError(f"Unknown parallel mode {mode!r}; use 'jit' or 'pmap'.")
        self.mode = mode
        axis_name = PMAP_AXIS if mode == "pmap" else None
        if mode == "pmap":
            model = model.clone(bn_axis_name=PMAP_AXIS)
        common = dict(model=model, num_classes=num_classes, mean=tuple(mean), std=tuple(std), axis_name=axis_name)
        train = functools.partial(step_lib.train_step, tx=tx, label_smoothing=label_smoothing,
                                  dynamic_loss_scale=dynamic_loss_scale, **common)
        evaluate = functools.partial(step_lib.eval_step, **common)
        if mode == "jit":
            self.mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
            self.replicated = NamedSharding(self.mesh, PartitionSpec())
            self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
            self._train = jax.jit(train, in_shardings=(self.replicated, self.batch_sharding),
                                  out_shardings=(self.replicated, self.replicated), donate_argnums=0)
            self._eval = jax.jit(evaluate, in_shardings=(self.replicated, self.batch_sharding),
                                 out_shardings=self.replicated)
        else:
            self._train = jax.pmap(train, axis_name=PMAP_AXIS, donate_argnums=0)
            self._eval = jax.pmap(evaluate, axis_name=PMAP_AXIS)

    @staticmethod
    def check_batch_size(batch_size: int, name: str = "batch_size") -> None:
        """Fail early (before reading data or compiling) on a batch the devices cannot split evenly."""
        devices = jax.device_count()
        if batch_size % devices:
            raise ValueError(f"config.{name} = {batch_size} is not divisible by the {devices} devices "
                             f"({jax.process_count()} process(es)); use a multiple of {devices}, e.g. "
                             f"{max(devices, batch_size // devices * devices)}.")

    def place_state(self, host_state: Any) -> Any:
        """Host numpy state -> replicated on every device (identical copies)."""
        if self.mode == "jit":
            return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)),
                                host_state)
        count = jax.local_device_count()
        stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (count, *np.shape(x))), host_state)
        # Through a pmap on the same axis, so the first step sees the layout of the step's own
        # outputs (numpy inputs would make the second step compile again).
        return jax.pmap(lambda tree: tree, axis_name=PMAP_AXIS)(stacked)

    def to_host(self, state: Any) -> Any:
        """Placed state -> host numpy (one copy)."""
        if self.mode == "jit":
            return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state)
        return jax.tree.map(lambda x: np.asarray(x[0]), state)

    def place_batch(self, local_batch: dict) -> dict:
        """This process's batch -> the global batch sharded over devices ('jit') or split per device ('pmap')."""
        if self.mode == "jit":
            return {k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()}
        count = jax.local_device_count()
        return {k: v.reshape(count, v.shape[0] // count, *v.shape[1:]) for k, v in local_batch.items()}

    def train_step(self, state: Any, batch: dict) -> tuple[Any, dict]:
        return self._train(state, batch)

    def eval_step(self, variables: dict, batch: dict) -> dict:
        return self._eval(variables, batch)

    def metrics_to_host(self, metrics: dict) -> dict:
        """Device metric sums -> Python floats (the first replica's copy under pmap)."""
        metrics = jax.device_get(metrics)
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda x: x[0], metrics)
        return {k: float(v) for k, v in metrics.items()}
