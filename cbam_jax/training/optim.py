"""The optimiser and learning-rate schedule described by a training config (optax), and which
parameters it leaves alone (config.freeze) or gives another learning rate (config.new_lr_factor)."""

import fnmatch
from collections.abc import Collection
from typing import Any

import jax
import ml_collections
import optax
from flax import traverse_util

from cbam_jax.errors import InvalidInput


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up (config.warmup_epochs) then 'constant', 'step' (x lr_step_factor every
    lr_step_epochs) or 'cosine' (to 0 at total_steps)."""
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    peak = config.learning_rate
    if config.schedule == "constant":
        main = optax.constant_schedule(peak)
    elif config.schedule == "step":
        every = max(1, int(round(config.lr_step_epochs * steps_per_epoch)))
        boundaries = {step - warmup: config.lr_step_factor for step in range(every, total_steps + 1, every) if step > warmup}
        main = optax.piecewise_constant_schedule(peak, boundaries)
    else:
        main = optax.cosine_decay_schedule(peak, max(1, total_steps - warmup))
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _decay_mask(params) -> object:
    """True for weights with more than one dimension (convs, dense kernels), False for BN and biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   labels: Any = None) -> optax.GradientTransformation:
    """clip (optional) -> weight decay -> SGD(-nesterov) with momentum, or AdamW (decoupled decay).

    SGD adds `weight_decay * param` to the gradient before momentum, as PyTorch's SGD does.
    `labels` (from `parameter_labels`, None for one group) split the parameters with
    optax.multi_transform: 'frozen' ones get zero updates (and no decay), 'new' ones the schedule
    times config.new_lr_factor; the gradient norm is clipped over all of them together.
    """
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm > 0 else []
    if labels is None:  # (the optimizer state of runs without groups keeps its layout: their checkpoints resume)
        parts += _update_rule(config, schedule)
    else:
        rules = {"trained": optax.chain(*_update_rule(config, schedule)), "frozen": optax.set_to_zero(),
                 "new": optax.chain(*_update_rule(config, lambda step: schedule(step) * config.new_lr_factor))}
        used = set(jax.tree.leaves(labels))
        parts.append(optax.multi_transform({k: v for k, v in rules.items() if k in used}, labels))
    return optax.chain(*parts)


def _update_rule(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> list[optax.GradientTransformation]:
    """Weight decay and the update of config.optimizer at the learning rate `schedule`."""
    mask = None if config.decay_norm_and_bias else _decay_mask
    if config.optimizer == "adamw":
        return [optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask)]
    decay = [optax.add_decayed_weights(config.weight_decay, mask)] if config.weight_decay > 0 else []
    return decay + [optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.optimizer == "nesterov")]


def freeze_patterns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """config.freeze ('conv1,bn1,layer1_*') as a tuple of patterns."""
    return tuple(pattern.strip() for pattern in config.freeze.split(",") if pattern.strip())


def is_frozen(path: str, patterns: Collection[str]) -> bool:
    """Whether the variable at `path` ('layer1_0/conv1/kernel', no collection) lies in a part that one of
    `patterns` names: a pattern (fnmatch: * ? [..]) matches the whole module path of one of its parents,
    so 'conv1' is the stem convolution only (not 'layer1_0/conv1'), 'layer1_*' the first stage and
    '*/attention' every CBAM module."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def parameter_labels(params: Any, patterns: Collection[str], new: Collection[str], new_lr_factor: float) -> Any:
    """The multi_transform labels of `params` ('frozen', 'new' or 'trained' per leaf), or None when every
    parameter is trained alike. `new`: flat 'params/...' paths that `init_from` initialised anew (they get
    the learning rate times `new_lr_factor`); `patterns`: config.freeze (frozen wins over new).

    Raises:
      ValueError: a pattern that names no parameter.
    """
    flat = traverse_util.flatten_dict(params, sep="/")
    for pattern in patterns:
        if not any(is_frozen(path, [pattern]) for path in flat):
            modules = sorted({path.rpartition("/")[0] for path in flat if "/" in path})
            raise InvalidInput(f"config.freeze pattern {pattern!r} names no part of the model; give module paths "
                             f"such as {', '.join(modules[:4])} (fnmatch patterns: 'layer1_*', '*/attention').")
    new = set(new)
    if not patterns and (not new or new_lr_factor == 1):
        return None
    labels = {path: "frozen" if is_frozen(path, patterns)
              else "new" if f"params/{path}" in new and new_lr_factor != 1 else "trained" for path in flat}
    return traverse_util.unflatten_dict(labels, sep="/")


def frozen_statistics(batch_stats: Any, patterns: Collection[str]) -> frozenset[str]:
    """The flat paths ('bn1/mean') of the BatchNorm statistics in frozen parts: the train step keeps them."""
    return frozenset(path for path in traverse_util.flatten_dict(batch_stats, sep="/") if is_frozen(path, patterns))
