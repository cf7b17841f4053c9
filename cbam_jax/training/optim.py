"""The optimiser and learning-rate schedule described by a training config (optax)."""

import jax
import ml_collections
import optax


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


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """clip (optional) -> weight decay -> SGD(-nesterov) with momentum, or AdamW (decoupled decay).

    SGD adds `weight_decay * param` to the gradient before momentum, as PyTorch's SGD does.
    """
    mask = None if config.decay_norm_and_bias else _decay_mask
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=config.weight_decay, mask=mask))
    else:
        if config.weight_decay > 0:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask))
        parts.append(optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.optimizer == "nesterov"))
    return optax.chain(*parts)
