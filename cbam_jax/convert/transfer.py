"""Weights from one cbam-jax model into another: a plain ResNet's backbone into a CBAM/SE/BAM-ResNet, a
classifier into a backbone (`features_only`) or under a new head.

    variables, report = transfer_variables(source_variables, create_model("cbam_resnet50"))
    print(report.summary())   # 320 tensors loaded, 96 new (attention 96), 0 dropped

Every tensor of the target that the source holds (same path, same shape) is copied; what the source
lacks is initialised exactly as the target's own `init` does (the attention as its variant prescribes,
e.g. the official zero spatial-BatchNorm scale; a new head when the class count differs); what only
the source has is dropped when it is the head or a part a backbone does not build. Anything else --
a backbone tensor the source lacks (another depth), a shape that differs outside the head, source
attention the target has no place for -- is one error listing all of it, and nothing is returned.
"""

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from flax.traverse_util import flatten_dict, unflatten_dict

from cbam_jax.convert.reading import ConversionError
from cbam_jax.resnet import ResNet

COLLECTIONS = ("params", "batch_stats")
# Per-block attention of the ResNets and of the MobileNets' units, and BAM.
ATTENTION = re.compile(r"^(params|batch_stats)/(layer\d+_\d+/attention|stage\d+_\d+/(dw|pw)_attention|bam\d+)/")
HEAD = re.compile(r"^params/fc/")
LISTED = 8  # paths shown per category in an error


@functools.partial(jax.jit, static_argnums=0)
def _init(model: ResNet, rng: jax.Array, x: jax.Array) -> dict[str, Any]:
    """`model.init`, compiled once per model configuration (models are hashable plain data)."""
    return model.init(rng, x)


def part_of(path: str) -> str:
    """'attention', 'head' or 'backbone': what the variable at `path` ('params/layer1_0/conv1/kernel') is."""
    if HEAD.match(path):
        return "head"
    return "attention" if ATTENTION.match(path) else "backbone"


@dataclasses.dataclass(frozen=True)
class TransferReport:
    """Which variables (flat 'collection/module/.../leaf' paths) were copied, initialised anew, or left out."""

    loaded: tuple[str, ...]
    new: tuple[str, ...]  # in the target, initialised by its own init (attention, a resized head)
    dropped: tuple[str, ...]  # in the source, not used (its head, stages a backbone does not build)

    def summary(self) -> str:
        """One line, e.g. '320 tensors loaded, 96 new (attention 96), 2 dropped (head 2)'."""
        def counted(paths: tuple[str, ...]) -> str:
            parts: dict[str, int] = {}
            for path in paths:
                parts[part_of(path)] = parts.get(part_of(path), 0) + 1
            return f" ({', '.join(f'{k} {v}' for k, v in sorted(parts.items()))})" if parts else ""
        return (f"{len(self.loaded)} tensors loaded, {len(self.new)} new{counted(self.new)}, "
                f"{len(self.dropped)} dropped{counted(self.dropped)}")


def transfer_variables(source: Mapping[str, Any], target: ResNet, *, rng: jax.Array | None = None,
                       initial: Mapping[str, Any] | None = None,
                       new_attention: bool = True) -> tuple[dict[str, Any], TransferReport]:
    """Variables for `target` from another model's `source` variables (see the module docstring).

    Args:
      source: {'params': ..., 'batch_stats': ...} of a cbam-jax ResNet (e.g. from `from_torch` or
        `load_pretrained`).
      target: the model to build variables for; its input channels are the source's.
      rng: key for `target.init`, used only when something is new (default: key 0).
      initial: the target's variables from its own init, if the caller has them already (e.g. a
        training state): new tensors are taken from there and nothing is initialised again.
      new_attention: allow attention the source lacks (transfer from a plain ResNet); False makes
        it an error (loading weights that should fit the target exactly, up to its head).

    Returns:
      (variables, report): {'params', 'batch_stats'} for `target.apply`, and what happened.

    Raises:
      ConversionError: the source does not fit (every problem listed).
    """
    found = {path: value for path, value in flatten_dict(
        {c: unfreeze(source[c]) for c in COLLECTIONS if c in source}, sep="/").items()}
    stem = found.get("params/conv1/kernel")
    if stem is None or np.ndim(stem) != 4:
        raise ConversionError("The source variables have no params/conv1/kernel: they are not a ResNet's.")
    dummy = jnp.zeros((1, 32, 32, np.shape(stem)[2]), target.dtype)
    abstract = jax.eval_shape(target.init, jax.random.key(0), dummy)
    expected = flatten_dict({c: unfreeze(abstract[c]) for c in COLLECTIONS if c in abstract}, sep="/")
    built = {path.split("/")[1] for path in expected}  # top-level modules the target has

    loaded, new, missing, reshaped, unexpected, dropped = [], [], [], [], [], []
    for path, leaf in expected.items():
        if path not in found:
            (new if part_of(path) == "head" or (new_attention and part_of(path) == "attention") else missing).append(path)
        elif np.shape(found[path]) != leaf.shape:
            if part_of(path) == "head":
                new.append(path)
            else:
                reshaped.append(f"{path}: source {tuple(np.shape(found[path]))}, target {tuple(leaf.shape)}")
        else:
            loaded.append(path)
    for path in sorted(set(found) - set(expected)):
        leaves_out = target.features_only and path.split("/")[1] not in built
        (dropped if part_of(path) == "head" or leaves_out else unexpected).append(path)
    dropped += [path for path in new if path in found]  # a head of another size is replaced
    if missing or reshaped or unexpected:
        raise ConversionError(_mismatch(missing, reshaped, unexpected, new_attention))

    values = {path: jnp.asarray(found[path], dtype=expected[path].dtype) for path in loaded}
    if new:
        if initial is None:
            initial = _init(target, jax.random.key(0) if rng is None else rng, dummy)
        fresh = flatten_dict({c: unfreeze(initial[c]) for c in COLLECTIONS if c in initial}, sep="/")
        values.update({path: fresh[path] for path in new})
    report = TransferReport(loaded=tuple(loaded), new=tuple(new), dropped=tuple(sorted(dropped)))
    return unflatten_dict(values, sep="/"), report


def _mismatch(missing: list[str], reshaped: list[str], unexpected: list[str], new_attention: bool) -> str:
    problems = []
    if missing:
        what = "backbone tensors" if new_attention else "tensors"
        problems.append(f"{len(missing)} {what} the source lacks ({', '.join(missing[:LISTED])}"
                        f"{' ...' if len(missing) > LISTED else ''})")
    if reshaped:
        problems.append(f"{len(reshaped)} of another shape ({'; '.join(reshaped[:LISTED])}"
                        f"{' ...' if len(reshaped) > LISTED else ''})")
    if unexpected:
        problems.append(f"{len(unexpected)} source tensors the target has no place for ({', '.join(unexpected[:LISTED])}"
                        f"{' ...' if len(unexpected) > LISTED else ''})")
    return ("The source weights do not fit the target model: " + "; ".join(problems)
            + ". Give a target of the source's depth, width and stem (attention may differ when the source has none).")
