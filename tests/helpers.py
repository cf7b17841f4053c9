"""Helpers shared by the tests (import them with `from tests.helpers import ...`)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def randomize(variables, seed=0):
    """Replace every leaf by random values (positive for BatchNorm variances), so that no
    parameter sits at a special initial value (zero BN scale, zero bias) that could hide a bug.

    The leaves may be arrays or the ShapeDtypeStructs of `jax.eval_shape(model.init, ...)`:
    tests that need only random parameters then skip the real initialisation. The values come
    from NumPy: an eager `jax.random` call would compile once per leaf shape."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
    new = []
    for path, leaf in leaves:
        value = 0.5 * rng.standard_normal(leaf.shape, dtype=np.float32)
        if getattr(path[-1], "key", None) == "var":
            value = np.abs(value) + 0.5
        new.append(jnp.asarray(value, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, new)


def to_numpy(tree):
    """Every leaf as a float64 NumPy array."""
    return jax.tree.map(lambda a: np.asarray(a, dtype=np.float64), tree)


def count_params(module, shape):
    """Parameters of a Linen module (a layer or a model) for an input of `shape`, from shapes only."""
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(shape))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def random_variables(model, input_shape=(1, 32, 32, 3), seed=0):
    """`randomize`d params and batch_stats of `model`, from their shapes (`jax.eval_shape` of its init)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
    return randomize({c: shapes[c] for c in ("params", "batch_stats") if c in shapes}, seed)


def private_cache(path: Path) -> Path:
    """A cache root for one test (`$CBAM_JAX_CACHE`) that shares the compiled native kernels of the
    environment's own cache root (`kernels/`, a symlink): each test's weights stay its own, and no
    test process compiles the oneDNN shim again (~10 s each)."""
    from cbam_jax.cache import cache_root

    shared = cache_root() / "kernels"
    shared.mkdir(parents=True, exist_ok=True)
    path.mkdir(parents=True, exist_ok=True)
    (path / "kernels").symlink_to(shared, target_is_directory=True)
    return path
