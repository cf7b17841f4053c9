"""Checks on weight arrays, shared by every reader of weights (PyTorch files, pretrained folders, the Hub):
`check_finite` (no NaN or inf) and `check_matches_model` (exactly the variables a model's init makes).

Ground layer: it knows arrays and Flax modules only through `model.init`, never a model class,
a file format or a cache.
"""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from cbam_jax.errors import InvalidInput

COLLECTIONS = ("params", "batch_stats")


class NonFiniteWeights(InvalidInput):
    """Weights that hold NaN or infinite values (e.g. saved from a diverged training run)."""

    def for_option(self, option: str) -> "NonFiniteWeights":
        """The same error naming the command-line `option` (e.g. '--allow-nonfinite') as the override."""
        return NonFiniteWeights(str(self).replace("allow_nonfinite=True", option))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'params': {'conv1': {'kernel': a}}} -> {'params/conv1/kernel': a}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, Mapping) else {name: value})
    return flat


def check_finite(arrays: Mapping[str, Any], origin: str, override: str = "allow_nonfinite=True") -> None:
    """NonFiniteWeights naming the arrays of `arrays` (nested mappings of arrays) with NaN or inf values.

    `override` is how the caller lets such weights through (an option name), said in the message.
    """
    flat = flatten(arrays)
    broken = [key for key, value in flat.items() if not np.isfinite(np.asarray(value, np.float32)).all()]
    if broken:
        raise NonFiniteWeights(f"{origin}: {len(broken)} of {len(flat)} weight arrays hold NaN or infinite values "
                               f"(e.g. {', '.join(broken[:3])}); these weights are broken (saved from a diverged "
                               f"run?). Use other weights, or {override} to load them anyway.")


def check_matches_model(origin: str, model: Any, variables: Mapping[str, Any]) -> None:
    """InvalidInput unless `variables` have exactly the structure and shapes of `model.init`'s
    params/batch_stats (a ResNet-like Flax module: its input channels are read from params/conv1/kernel)."""
    stem = variables.get("params", {}).get("conv1", {}).get("kernel")
    if stem is None:
        raise InvalidInput(f"{origin}: the weights have no params/conv1/kernel; they are not a ResNet's.")
    dummy = jax.ShapeDtypeStruct((1, 32, 32, np.shape(stem)[2]), model.dtype)
    expected = jax.eval_shape(model.init, jax.random.key(0), dummy)
    expected_shapes = {k: tuple(v.shape) for k, v in flatten({c: expected[c] for c in COLLECTIONS
                                                               if c in expected}).items()}
    found_shapes = {k: tuple(np.shape(v)) for k, v in flatten(variables).items()}
    if expected_shapes != found_shapes:
        missing = sorted(set(expected_shapes) - set(found_shapes))
        unexpected = sorted(set(found_shapes) - set(expected_shapes))
        reshaped = sorted(k for k in set(expected_shapes) & set(found_shapes) if expected_shapes[k] != found_shapes[k])
        raise InvalidInput(f"{origin}: the weights do not fit the model in its config: missing {missing[:10]}, "
                           f"unexpected {unexpected[:10]}, wrong shape {reshaped[:10]}.")
