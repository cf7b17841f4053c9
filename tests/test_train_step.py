"""Pieces of the step without a network: schedules, weight-decay masking, fp16 dynamic loss scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbam_jax.training import step as step_lib
from cbam_jax.training.config import base_config
from cbam_jax.training.optim import learning_rate_schedule, make_optimizer


def config(**changes):
    c = base_config()
    for key, value in changes.items():
        setattr(c, key, value)
    return c


def test_step_schedule_is_the_papers():
    schedule = learning_rate_schedule(config(schedule="step", learning_rate=0.1, lr_step_epochs=30.0), 10, 900)
    assert [float(schedule(s)) for s in (0, 299, 300, 599, 600, 899)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_warmup_then_cosine():
    schedule = learning_rate_schedule(config(schedule="cosine", learning_rate=0.4, warmup_epochs=2.0), 10, 100)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(0.2)
    assert float(schedule(20)) == pytest.approx(0.4) and float(schedule(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("decay_norm_and_bias", [True, False])
def test_weight_decay_mask(decay_norm_and_bias):
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}}
    tx = make_optimizer(config(optimizer="sgd", momentum=0.0, weight_decay=0.5,
                               decay_norm_and_bias=decay_norm_and_bias), 1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert float(updates["conv"]["kernel"][0, 0, 0, 0]) == pytest.approx(-0.5)
    assert float(updates["bn"]["scale"][0]) == pytest.approx(-0.5 if decay_norm_and_bias else 0.0)


def _two_updates(tx, params, gradients):
    state = tx.init(params)
    for gradient in gradients:
        updates, state = tx.update({"w": gradient}, state, params)
    return np.asarray(updates["w"])


def test_adamw_and_clipping_build():
    """Adam normalises a single step, so clipping shows on the second: a huge gradient then a small
    one. The clipped optimizer must act exactly as the unclipped one fed the clipped gradients."""
    params = {"w": jnp.ones((2, 2))}
    huge, small = jnp.full((2, 2), 1e6), jnp.full((2, 2), 0.1)  # global norms 2e6 (clipped to 1) and 0.2 (kept)
    clipped = make_optimizer(config(optimizer="adamw", weight_decay=0.01, grad_clip_norm=1.0), 1e-3)
    unclipped = make_optimizer(config(optimizer="adamw", weight_decay=0.01, grad_clip_norm=0.0), 1e-3)
    got = _two_updates(clipped, params, [huge, small])
    np.testing.assert_allclose(got, _two_updates(unclipped, params, [huge / 2e6, small]), rtol=1e-6)
    without_clipping = _two_updates(unclipped, params, [huge, small])
    assert np.all(np.abs(got - without_clipping) > 0.1 * np.abs(without_clipping))


def test_fp16_loss_scaling_skips_overflow_and_grows():
    tx = optax.sgd(1.0, momentum=0.9)
    old = step_lib.state_from_variables({"params": {"w": jnp.ones(2)}, "batch_stats": {"mean": jnp.ones(2)}}, tx,
                                        dynamic_loss_scale=True)
    _, moved_opt_state = tx.update({"w": jnp.ones(2)}, old.opt_state)
    new = old.replace(step=old.step + 1, params={"w": jnp.zeros(2)}, batch_stats={"mean": jnp.full(2, 3.0)},
                      opt_state=moved_opt_state)
    skipped = step_lib._apply_loss_scaling(old, new, jnp.asarray(False))
    kept = step_lib._apply_loss_scaling(old, new, jnp.asarray(True))
    # An overflow keeps the whole old training state (but the step count); a finite step takes the new one.
    for result, expected in ((skipped, old), (kept, new)):
        for part in ("params", "batch_stats", "opt_state"):
            assert jax.tree.structure(getattr(result, part)) == jax.tree.structure(getattr(expected, part))
            jax.tree.map(np.testing.assert_array_equal, getattr(result, part), getattr(expected, part))
    assert float(skipped.loss_scale) == step_lib.LOSS_SCALE_INIT / 2 and int(skipped.step) == 1
    assert float(kept.loss_scale) == step_lib.LOSS_SCALE_INIT and int(kept.finite_steps) == 1
    due = old.replace(finite_steps=jnp.asarray(step_lib.LOSS_SCALE_PERIOD - 1, jnp.int32))
    grown = step_lib._apply_loss_scaling(due, new, jnp.asarray(True))
    assert float(grown.loss_scale) == 2 * step_lib.LOSS_SCALE_INIT and int(grown.finite_steps) == 0
    not_yet = old.replace(finite_steps=jnp.asarray(step_lib.LOSS_SCALE_PERIOD - 2, jnp.int32))
    waited = step_lib._apply_loss_scaling(not_yet, new, jnp.asarray(True))
    assert float(waited.loss_scale) == step_lib.LOSS_SCALE_INIT
    assert int(waited.finite_steps) == step_lib.LOSS_SCALE_PERIOD - 1
    # The scale halves on overflow down to 1, never below: 2 -> 1 -> 1.
    for before, after in ((2.0, 1.0), (1.0, 1.0)):
        at = old.replace(loss_scale=jnp.asarray(before, jnp.float32))
        assert float(step_lib._apply_loss_scaling(at, new, jnp.asarray(False)).loss_scale) == after


def test_loss_scale_leaves_the_step_unchanged():
    """One train step with loss scale 2^15 equals the step with loss scale 1 in float32: scaling by a
    power of two is exact, so the scaled gradients divided by the scale are the unscaled ones bit for
    bit. A step that scales one side but not the other (e.g. differentiates the unscaled loss and
    still divides by the scale: updates 32768x too small) changes every parameter."""
    from cbam_jax import ResNet
    from cbam_jax.images import normalize
    from tests.helpers import random_variables

    model = ResNet(stage_sizes=(1,), block="basic", num_classes=4, stem="cifar", attention="cbam",
                   attention_options={"reduction": 4}, width=8)
    tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9))  # weight decay reads params
    variables = random_variables(model, (1, 8, 8, 3))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), "label": np.asarray([0, 1, 2, 3], np.int32)}
    step = jax.jit(lambda state, batch: step_lib.train_step(
        state, batch, model=model, tx=tx, num_classes=4, label_smoothing=0.1, mean=(0.5,) * 3, std=(0.25,) * 3,
        dynamic_loss_scale=False))
    unscaled = step_lib.state_from_variables(variables, tx, dynamic_loss_scale=False)
    scaled = unscaled.replace(loss_scale=jnp.asarray(2.0**15, jnp.float32))  # the same compiled step
    assert float(unscaled.loss_scale) == 1.0
    after_unscaled, metrics_unscaled = step(unscaled, batch)
    after_scaled, metrics_scaled = step(scaled, batch)
    assert float(metrics_scaled["loss_scale"]) == 2.0**15
    assert float(metrics_scaled["loss_sum"]) == float(metrics_unscaled["loss_sum"])
    # The step itself against a direct training-mode forward: loss, accuracy and BatchNorm statistics.
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, normalize(batch["image"], (0.5,) * 3, (0.25,) * 3))
    targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], 4), 0.1)
    expected_loss = float(optax.softmax_cross_entropy(logits, targets).mean())
    assert float(metrics_unscaled["loss_sum"]) == pytest.approx(4 * expected_loss, rel=1e-6)
    assert float(metrics_unscaled["correct"]) == float(np.sum(np.argmax(logits, -1) == batch["label"]))
    assert float(metrics_unscaled["count"]) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), after_unscaled.batch_stats,
                 updates["batch_stats"])
    assert int(after_unscaled.step) == 1 and metrics_unscaled["correct"].dtype == jnp.float32
    assert jax.tree.structure(after_unscaled.opt_state) == jax.tree.structure(unscaled.opt_state)
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in
               zip(jax.tree.leaves(after_unscaled.opt_state), jax.tree.leaves(unscaled.opt_state)))  # momentum
    predicted = np.argmax(logits, -1).astype(np.int32)  # labels the model gets all right
    _, metrics_right = step(unscaled, {**batch, "label": predicted})
    assert float(metrics_right["correct"]) == 4
    # Dynamic loss scaling: a finite step is the same step (and counts); an overflowing one is skipped.
    dynamic = jax.jit(lambda state, batch: step_lib.train_step(
        state, batch, model=model, tx=tx, num_classes=4, label_smoothing=0.1, mean=(0.5,) * 3, std=(0.25,) * 3,
        dynamic_loss_scale=True))
    after_dynamic, _ = dynamic(scaled, batch)
    jax.tree.map(np.testing.assert_array_equal, after_dynamic.params, after_unscaled.params)
    assert float(after_dynamic.loss_scale) == 2.0**15 and int(after_dynamic.finite_steps) == 1
    overflowing = scaled.replace(loss_scale=jnp.asarray(np.inf, jnp.float32))  # gradients inf (or NaN)
    skipped, _ = dynamic(overflowing, batch)
    jax.tree.map(np.testing.assert_array_equal, skipped.params, overflowing.params)
    assert int(skipped.finite_steps) == 0 and int(skipped.step) == 1
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         after_unscaled.params, unscaled.params)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter takes a step
    for name in ("params", "batch_stats", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(after_scaled, name)), jax.tree.leaves(getattr(after_unscaled, name))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _tiny_step_setup():
    from cbam_jax import ResNet
    from tests.helpers import random_variables

    model = ResNet(stage_sizes=(1,), block="basic", num_classes=4, stem="cifar", attention="cbam",
                   attention_options={"reduction": 4}, width=8)
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), "label": np.asarray([0, 1, 2, 3], np.int32)}
    return model, random_variables(model, (1, 8, 8, 3)), batch


@pytest.mark.slow  # compiles a vmapped training step (seconds); the axis is also in test_cpu_ops' BatchNorm
def test_step_over_a_device_axis_averages_gradients_statistics_and_sums_metrics():
    """With `axis_name`, each shard's gradients and BatchNorm statistics are averaged over the axis
    and the metric sums added up: under `jax.vmap` (an axis in one process), plain SGD after the
    step equals the mean of the two shards' separate steps, and every shard holds the same state."""
    model, variables, batch = _tiny_step_setup()
    tx = optax.sgd(0.1)
    state = step_lib.state_from_variables(variables, tx, dynamic_loss_scale=False)
    common = dict(model=model, tx=tx, num_classes=4, label_smoothing=0.0, mean=(0.5,) * 3, std=(0.25,) * 3,
                  dynamic_loss_scale=False)
    shards = jax.tree.map(lambda a: a.reshape(2, 2, *a.shape[1:]), batch)
    synced, metrics = jax.jit(jax.vmap(lambda b: step_lib.train_step(state, b, axis_name="devices", **common),
                                       axis_name="devices"))(shards)
    alone = [jax.jit(lambda b: step_lib.train_step(state, b, **common))(jax.tree.map(lambda a: a[i], shards))
             for i in range(2)]
    for part in ("params", "batch_stats"):
        mean = jax.tree.map(lambda a, b: (a + b) / 2, getattr(alone[0][0], part), getattr(alone[1][0], part))
        for shard in range(2):
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a[shard], b, rtol=1e-5, atol=1e-6),
                         getattr(synced, part), mean)
    for name in ("loss_sum", "correct", "count"):
        for shard in range(2):
            assert float(metrics[name][shard]) == pytest.approx(float(alone[0][1][name] + alone[1][1][name]), rel=1e-6)


def test_frozen_statistics_keep_their_values():
    model, variables, batch = _tiny_step_setup()
    tx = optax.sgd(0.1)
    state = step_lib.state_from_variables(variables, tx, dynamic_loss_scale=False)
    frozen = frozenset({"bn1/mean", "bn1/var"})
    after, _ = jax.jit(lambda s, b: step_lib.train_step(
        s, b, model=model, tx=tx, num_classes=4, label_smoothing=0.0, mean=(0.5,) * 3, std=(0.25,) * 3,
        dynamic_loss_scale=False, frozen_statistics=frozen))(state, batch)
    for name in ("mean", "var"):
        np.testing.assert_array_equal(after.batch_stats["bn1"][name], state.batch_stats["bn1"][name])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after.batch_stats["layer1_0"],
                         state.batch_stats["layer1_0"])
    assert min(jax.tree.leaves(moved)) > 0  # the others train
