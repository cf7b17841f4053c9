"""The train and eval steps, written once for every parallel mode.

With `axis_name=None` the step runs under `jax.jit` on a (possibly sharded) global batch: means and
BatchNorm statistics are global already. With `axis_name` set (one name or a tuple of mesh axes) the
step runs per device, under `jax.pmap` or `jax.shard_map`, on that device's share of the batch and
averages gradients, batch statistics and metrics over the axes (the model's own `bn_axis_name` says
over which devices each BatchNorm shares its statistics).
Metrics are sums (loss_sum, correct, count), so they add up exactly across devices and batches.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.traverse_util import flatten_dict, unflatten_dict

from cbam_jax.images import normalize

# fp16 dynamic loss scaling: start high, halve on overflow, double after this many finite steps.
LOSS_SCALE_INIT = 2.0**15
LOSS_SCALE_PERIOD = 2000


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (all arrays, so it checkpoints as one pytree)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    loss_scale: jax.Array  # 1 unless precision is float16
    finite_steps: jax.Array  # finite steps since the loss scale last changed


def create_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array, image_shape: tuple,
                 dynamic_loss_scale: bool) -> TrainState:
    """Initialise the model on a dummy batch (1, H, W, C) and the optimiser on its parameters."""
    # One compiled program instead of hundreds of eagerly dispatched ops (and cacheable on disk).
    init = jax.jit(lambda key: state_from_variables(
        model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False), tx, dynamic_loss_scale))
    return init(rng)


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple) -> dict:
    """The model's initial variables {'params', 'batch_stats'} from a dummy batch (1, H, W, C), as one
    compiled program."""
    return jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False))(rng)


def state_from_variables(variables: Any, tx: optax.GradientTransformation, dynamic_loss_scale: bool) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=tx.init(params),
                      loss_scale=jnp.asarray(LOSS_SCALE_INIT if dynamic_loss_scale else 1.0, jnp.float32),
                      finite_steps=jnp.zeros((), jnp.int32))


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tx: optax.GradientTransformation,
               num_classes: int, label_smoothing: float, mean: tuple, std: tuple, dynamic_loss_scale: bool,
               axis_name: str | tuple[str, ...] | None = None,
               frozen_statistics: frozenset[str] = frozenset()) -> tuple[TrainState, dict]:
    """One SGD step on `batch` {'image': uint8 (B, H, W, C), 'label': int (B,)}; returns (state, metric sums).
    The BatchNorm statistics at `frozen_statistics` (flat paths, 'bn1/mean') keep their values."""
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)

    def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss * state.loss_scale, (loss, logits, updates["batch_stats"])

    grads, (loss, logits, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        batch_stats = jax.lax.pmean(batch_stats, axis_name)
    if frozen_statistics:
        batch_stats = keep_leaves(batch_stats, state.batch_stats, frozen_statistics)
    grads = jax.tree.map(lambda g: g / state.loss_scale, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
    if dynamic_loss_scale:
        new_state = keep_finite_update(state, new_state, grads)
    metrics = {"loss_sum": loss * labels.shape[0],
               "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
               "count": jnp.asarray(labels.shape[0], jnp.float32)}
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
    metrics["loss_scale"] = state.loss_scale
    return new_state, metrics


def keep_leaves(updated: Any, old: Any, paths: frozenset[str]) -> Any:
    """`updated` with the leaves at `paths` (flat, '/'-joined, e.g. 'bn1/mean') taken from `old`: the
    frozen BatchNorm statistics of a training step (classification and detection)."""
    flat, before = flatten_dict(updated, sep="/"), flatten_dict(old, sep="/")
    return unflatten_dict({path: before[path] if path in paths else value for path, value in flat.items()}, sep="/")


def keep_finite_update(old: TrainState, new: TrainState, grads: Any) -> TrainState:
    """float16 dynamic loss scaling after an update from unscaled `grads` (classification and
    detection): `new` if every gradient is finite, else `old`'s variables; the scale adapts."""
    return _apply_loss_scaling(old, new, _all_finite(grads))


def _apply_loss_scaling(old: TrainState, new: TrainState, finite: jax.Array) -> TrainState:
    """Keep the update only if the gradients were finite; halve the scale on overflow, double it
    after LOSS_SCALE_PERIOD finite steps."""
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), (new.params, new.batch_stats, new.opt_state),
                        (old.params, old.batch_stats, old.opt_state))
    grow = finite & (old.finite_steps + 1 >= LOSS_SCALE_PERIOD)
    scale = jnp.where(finite, jnp.where(grow, old.loss_scale * 2, old.loss_scale), jnp.maximum(old.loss_scale / 2, 1.0))
    finite_steps = jnp.where(finite & ~grow, old.finite_steps + 1, 0)
    return new.replace(params=kept[0], batch_stats=kept[1], opt_state=kept[2], loss_scale=scale,
                       finite_steps=finite_steps)


def eval_step(variables: dict, batch: dict, *, model: nn.Module, num_classes: int, mean: tuple, std: tuple,
              axis_name: str | tuple[str, ...] | None = None) -> dict:
    """Metric sums over the real examples of `batch` (its 'mask' marks padding False)."""
    logits = model.apply(variables, normalize(batch["image"], mean, std), train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
    metrics = {"loss_sum": jnp.sum(loss * mask), "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
               "count": jnp.sum(mask)}
    if axis_name is not None:
        metrics = jax.lax.psum(metrics, axis_name)
    return metrics
