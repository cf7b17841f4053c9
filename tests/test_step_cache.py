"""cached_step: a step exported on the first run is loaded (not traced) later and computes the same."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cbam_jax.layers import cpu_ops
from cbam_jax.step_cache import cached_step

NHWC = ("NHWC", "HWIO", "NHWC")


def _problem():
    """A conv + dense regression trained by SGD with momentum: optax's namedtuple states in the state tree."""
    rng = np.random.default_rng(0)
    params = {"kernel": jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32) * 0.1,
              "dense": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32) * 0.1}
    optimizer = optax.sgd(0.1, momentum=0.9)
    images = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
    targets = jnp.asarray(rng.standard_normal((2, 2)), jnp.float32)
    traced = []

    def step(state, images, targets):
        traced.append(1)  # counts traces
        params, opt_state = state

        def loss_fn(p):
            y = cpu_ops.conv_general_dilated(images, p["kernel"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
            return jnp.mean((jnp.mean(jax.nn.relu(y), axis=(1, 2)) @ p["dense"] - targets) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), {"loss": loss, "parts": [loss * 2, None]}

    return step, (params, optimizer.init(params)), images, targets, traced


def test_second_call_loads_the_exported_step_without_tracing_and_agrees(tmp_path):
    step, state, images, targets, traced = _problem()
    expected_state, expected_aux = jax.jit(step)(state, images, targets)

    first, loaded = cached_step(step, (state, images, targets), tmp_path, key="model-a", donate_state=False)
    assert not loaded and len(traced) == 2  # the reference jit above, then the export
    second, loaded = cached_step(step, (state, images, targets), tmp_path, key="model-a", donate_state=False)
    assert loaded and len(traced) == 2  # not traced again
    for call in (first, second):
        new_state, aux = call(state, images, targets)
        assert jax.tree.structure(new_state) == jax.tree.structure(expected_state)
        assert jax.tree.structure(aux) == jax.tree.structure(expected_aux)
        for a, e in zip(jax.tree.leaves((new_state, aux)), jax.tree.leaves((expected_state, expected_aux))):
            np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7)


def test_another_key_or_shape_is_another_entry(tmp_path):
    step, state, images, targets, traced = _problem()
    cached_step(step, (state, images, targets), tmp_path, key="model-a")
    assert not cached_step(step, (state, images, targets), tmp_path, key="model-b")[1]
    assert not cached_step(step, (state, images[:1], targets[:1]), tmp_path, key="model-a")[1]
    assert cached_step(step, (state, images, targets), tmp_path, key="model-b")[1]
    assert len(list(tmp_path.glob("*.stablehlo"))) == 3 and not list(tmp_path.glob(".tmp-*"))


def test_donated_state_and_a_step_that_changes_the_state_structure(tmp_path):
    step, state, images, targets, _ = _problem()
    call, _ = cached_step(step, (state, images, targets), tmp_path)
    old_leaf = jax.tree.leaves(state)[0]
    call(state, images, targets)
    assert old_leaf.is_deleted()  # the state's buffers were donated
    with pytest.raises(ValueError, match="another structure"):
        cached_step(lambda s, x: ((s, s), x), (jnp.ones(2), jnp.ones(2)), tmp_path)
