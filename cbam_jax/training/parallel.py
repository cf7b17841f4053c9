"""Data parallelism: the same step functions placed with `jax.jit` over a Mesh, or with `jax.pmap`.

- 'jit' (default): a Mesh over all devices of all processes, axes ('data', 'bn'). The global batch
  is sharded over both axes, the state replicated and donated (explicit `NamedSharding`s); calls
  run under `jax.set_mesh(mesh)`. With `bn_group_size == 0` XLA partitions the global program and
  BatchNorm statistics are global. With `bn_group_size = N` the step is a `jax.shard_map` over the
  mesh of shape (devices / N, N): each BatchNorm averages its statistics over the 'bn' axis (a
  group of N neighbouring devices, MLPerf's "BN span"), gradients, running statistics and
  metrics over all devices.
- 'pmap' (legacy): one program per local device on axis 'batch' (the Flax ImageNet example's
  layout); the model's BatchNorms get `bn_axis_name='batch'` and the step averages over the axis.
  Since JAX 0.8 `jax.pmap` is implemented with jit + shard_map and in maintenance mode.

The state always leaves and enters as host numpy (`to_host` / `place_state`), so checkpoints do not
depend on the mode or the device count. `prefetch` places the next batches on the devices while the
current step runs.
"""

import collections
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from cbam_jax.errors import InvalidInput
from cbam_jax.training import step as step_lib

PMAP_AXIS = "batch"
# The jit mode's mesh axes: groups of devices x devices in a group (BatchNorm statistics are shared
# within a group when config.bn_group_size > 0). The batch is split over both.
MESH_AXES = ("data", "bn")
PREFETCH_BATCHES = 2


class DataParallel:
    """Compiled train/eval steps of one mode plus the matching placement of state and batches."""

    def __init__(self, mode: str, model: nn.Module, tx, *, num_classes: int = 0, label_smoothing: float = 0.0,
                 mean: tuple = (), std: tuple = (), dynamic_loss_scale: bool = False, bn_group_size: int = 0,
                 frozen_statistics: frozenset[str] = frozenset(), steps: tuple[Callable, Callable] | None = None,
                 with_bn_axis: Callable[[nn.Module, Any], nn.Module] | None = None):
        """`steps`: (train, eval or None) step functions taking `model=` and `axis_name=` keywords,
        placed instead of the classification steps (detection's); `with_bn_axis(model, axis)`: the model
        whose BatchNorms share statistics over `axis` (default `model.clone(bn_axis_name=axis)`)."""
        if mode not in ("jit", "pmap"):
            raise ValueError(f"Unknown parallel mode {mode!r}; use 'jit' or 'pmap'.")
        self.check_bn_group_size(bn_group_size, mode)
        self.mode = mode
        self.bn_group_size = bn_group_size
        with_bn_axis = with_bn_axis or (lambda m, axis: m.clone(bn_axis_name=axis))
        if steps is not None:
            train, evaluate = steps
        else:
            common = dict(num_classes=num_classes, mean=tuple(mean), std=tuple(std))
            train = functools.partial(step_lib.train_step, tx=tx, label_smoothing=label_smoothing,
                                      dynamic_loss_scale=dynamic_loss_scale, frozen_statistics=frozen_statistics,
                                      **common)
            evaluate = functools.partial(step_lib.eval_step, **common)
        if mode == "pmap":
            model = with_bn_axis(model, PMAP_AXIS)
            self._train = jax.pmap(functools.partial(train, model=model, axis_name=PMAP_AXIS),
                                   axis_name=PMAP_AXIS, donate_argnums=0)
            self._eval = evaluate and jax.pmap(functools.partial(evaluate, model=model, axis_name=PMAP_AXIS),
                                               axis_name=PMAP_AXIS)
            return
        devices = jax.device_count()
        group = bn_group_size or devices
        self.mesh = jax.make_mesh((devices // group, group), MESH_AXES,
                                  axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(MESH_AXES))
        if bn_group_size:
            # Per-device code: BatchNorm reduces over 'bn' only; the step averages over every device.
            # The step is written with pmap's semantics (per-device gradients, explicit pmean), so
            # shard_map's varying-axes typing, which would sum gradients of the replicated
            # parameters itself, is off.
            grouped = with_bn_axis(model, MESH_AXES[1])
            train = jax.shard_map(functools.partial(train, model=grouped, axis_name=MESH_AXES),
                                  in_specs=(PartitionSpec(), PartitionSpec(MESH_AXES)),
                                  out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)
        else:
            train = functools.partial(train, model=model)
        self._train = jax.jit(train, in_shardings=(self.replicated, self.batch_sharding),
                              out_shardings=(self.replicated, self.replicated), donate_argnums=0)
        # Evaluation uses the running statistics: no BatchNorm communication, any grouping.
        self._eval = evaluate and jax.jit(functools.partial(evaluate, model=model),
                                          in_shardings=(self.replicated, self.batch_sharding),
                                          out_shardings=self.replicated)

    @staticmethod
    def check_batch_size(batch_size: int, name: str = "batch_size") -> None:
        """Fail early (before reading data or compiling) on a batch the devices cannot split evenly."""
        devices = jax.device_count()
        if batch_size % devices:
            raise InvalidInput(f"config.{name} = {batch_size} is not divisible by the {devices} devices "
                             f"({jax.process_count()} process(es)); use a multiple of {devices}, e.g. "
                             f"{max(devices, batch_size // devices * devices)}.")

    @staticmethod
    def check_bn_group_size(bn_group_size: int, mode: str = "jit") -> None:
        """Fail early on a BatchNorm group that does not tile the devices (or a mode without groups)."""
        if not bn_group_size:
            return
        devices = jax.device_count()
        if mode != "jit":
            raise InvalidInput(f"config.bn_group_size = {bn_group_size} needs config.parallel = 'jit' "
                             "('pmap' computes BatchNorm statistics over all devices); set bn_group_size=0 or parallel='jit'.")
        if bn_group_size < 0 or devices % bn_group_size:
            divisors = [d for d in range(1, devices + 1) if devices % d == 0]
            raise InvalidInput(f"config.bn_group_size = {bn_group_size} does not divide the {devices} devices; "
                             f"use 0 (global statistics) or one of {divisors}.")

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

    def prefetch(self, stream: Iterator[dict], size: int = PREFETCH_BATCHES) -> "DevicePrefetch":
        """The batches of `stream` placed on the devices, `size` ahead of the step (see `DevicePrefetch`)."""
        return DevicePrefetch(stream, self.place_batch, size)

    def train_step(self, state: Any, batch: dict) -> tuple[Any, dict]:
        if self.mode == "jit":
            with jax.set_mesh(self.mesh):
                return self._train(state, batch)
        return self._train(state, batch)

    def eval_step(self, variables: dict, batch: dict) -> dict:
        if self.mode == "jit":
            with jax.set_mesh(self.mesh):
                return self._eval(variables, batch)
        return self._eval(variables, batch)

    def metrics_to_host(self, metrics: dict) -> dict:
        """Device metric sums -> Python floats (the first replica's copy under pmap)."""
        metrics = jax.device_get(metrics)
        if self.mode == "pmap":
            metrics = jax.tree.map(lambda x: x[0], metrics)
        return {k: float(v) for k, v in metrics.items()}


class DevicePrefetch:
    """Placed batches `size` steps ahead: the copy of the next batch to the devices overlaps the
    current (asynchronously dispatched) step, as the Flax ImageNet example's `prefetch_to_device`.

    `get_state()` is the data iterator's state after the last batch handed out, not after the
    batches read ahead, so a checkpoint resumes exactly at the next unseen batch.
    """

    def __init__(self, stream: Iterator[dict], place: Callable[[dict], dict], size: int = PREFETCH_BATCHES):
        if size < 1:
            raise ValueError(f"DevicePrefetch: size must be >= 1; got {size}.")
        self.stream, self.place, self.size = stream, place, size
        self.queue: collections.deque = collections.deque()
        self.state = stream.get_state()

    def __iter__(self) -> "DevicePrefetch":
        return self

    def __next__(self) -> dict:
        while len(self.queue) < self.size:
            try:
                batch = next(self.stream)
            except StopIteration:
                break
            self.queue.append((self.place(batch), self.stream.get_state()))
        if not self.queue:
            raise StopIteration
        placed, self.state = self.queue.popleft()
        return placed

    def get_state(self) -> Any:
        """The stream's state after the last batch returned by `__next__` (for checkpoints)."""
        return self.state
