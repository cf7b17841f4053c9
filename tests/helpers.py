"""Helpers shared by the tests (import them with `from tests.helpers import ...`)."""

import jax
import jax.numpy as jnp
import numpy as np


def randomize(variables, seed=0):
    """Replace every leaf by random values (positive for BatchNorm variances), so that no
    parameter sits at a special initial value (zero BN scale, zero bias) that could hide a bug."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = []
    for (path, leaf), key in zip(leaves, keys):
        value = 0.5 * jax.random.normal(key, leaf.shape, leaf.dtype)
        if getattr(path[-1], "key", None) == "var":
            value = jnp.abs(value) + 0.5
        new.append(value)
    return jax.tree_util.tree_unflatten(treedef, new)


def to_numpy(tree):
    """Every leaf as a float64 NumPy array."""
    return jax.tree.map(lambda a: np.asarray(a, dtype=np.float64), tree)


def random_variables(model, input_shape=(1, 32, 32, 3), seed=0):
    """`randomize`d params and batch_stats of `model`, from their shapes (`jax.eval_shape` of its init)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return randomize({c: shapes[c] for c in ("params", "batch_stats") if c in shapes}, seed)
