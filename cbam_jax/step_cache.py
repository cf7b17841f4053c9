"""A jitted step that a later process loads from disk instead of tracing it again (`jax.export`).

A warm start with JAX's persistent compilation cache still traces the step (Flax's apply, the
gradient, the optimiser: about 1 s for a CBAM-ResNet-50 train step) and lowers it to StableHLO
(0.4 s) before the cache can find the compiled program. `cached_step` serialises the exported
StableHLO of the step beside the compilation cache on the first run; later processes deserialise
it, which skips tracing and lowering, and XLA's persistent cache (when configured) skips the
compilation too.

The step must have the form `step(state, *inputs) -> (new_state, aux)`, where `new_state` has the
structure of `state` (any pytree) and `aux` is a pytree of dicts, lists, tuples and None (metrics,
a loss): its structure is stored as a protocol buffer, never a pickle. The cache entry's name
hashes everything that could change the program: the caller's `key` (e.g. the model config),
the step function's name, the arguments' structures, shapes and dtypes, the versions of jax,
jaxlib, flax and optax, and the source of every cbam_jax module. Single-device programs only.
"""

import functools
import hashlib
import importlib.metadata
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax import export

from cbam_jax.atomic import atomic_output
from cbam_jax.layers import native

_PACKAGE = pathlib.Path(__file__).parent
_VERSIONS = ("jax", "jaxlib", "flax", "optax")


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*")):
        if path.suffix in (".py", ".cc"):
            digest.update(str(path.relative_to(_PACKAGE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _entry_name(step: Callable, key: str, args: Sequence[Any]) -> str:
    leaves, treedef = jax.tree.flatten(args)
    parts = [key, getattr(step, "__module__", ""), getattr(step, "__qualname__", repr(step)), str(treedef),
             *(f"{jax.numpy.shape(x)}:{jax.numpy.result_type(x)}" for x in leaves), _source_digest(),
             jax.default_backend()]
    for dist in _VERSIONS:
        try:
            parts.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{dist} absent")
    return "step-" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _custom_call_targets() -> list[str]:
    """The native kernels' XLA custom calls (registered now, so that a loaded program can run)."""
    if jax.default_backend() != "cpu":
        return []
    return list(native.TARGETS) if native.enabled() else []


def cached_step(step: Callable, args: Sequence[Any], cache_dir: str | os.PathLike, key: str = "",
                donate_state: bool = True) -> tuple[Callable, bool]:
    """A jitted `step` for arguments shaped like `args` = (state, *inputs), loaded from or saved to `cache_dir`.

    Returns (call, loaded): `call(state, *inputs) -> (new_state, aux)` runs the compiled step (the
    state's buffers donated if `donate_state`), and `loaded` says whether it came from the cache
    (no tracing) or was traced and exported now.
    """
    state_leaves, state_tree = jax.tree.flatten(args[0])
    input_leaves, input_tree = jax.tree.flatten(tuple(args[1:]))
    num_state = len(state_leaves)
    directory = pathlib.Path(os.path.expanduser(os.fspath(cache_dir)))
    name = _entry_name(step, key, args)
    module_path, aux_path = directory / f"{name}.stablehlo", directory / f"{name}.aux_tree"
    targets = _custom_call_targets()
    loaded = module_path.exists() and aux_path.exists()
    if loaded:
        exported = export.deserialize(bytearray(module_path.read_bytes()))
        aux_tree = jax.tree_util.PyTreeDef.deserialize_using_proto(jax.tree_util.default_registry,
                                                                     aux_path.read_bytes())
    else:
        aux_holder = []

        def flat_step(*leaves):
            state = jax.tree.unflatten(state_tree, leaves[:num_state])
            inputs = jax.tree.unflatten(input_tree, leaves[num_state:])
            new_state, aux = step(state, *inputs)
            new_leaves, new_tree = jax.tree.flatten(new_state)
            if new_tree != state_tree:
                raise ValueError(f"cached_step: the step's new state has another structure than its state "
                                 f"({new_tree} vs {state_tree}).")
            aux_leaves, tree = jax.tree.flatten(aux)
            aux_holder.append(tree)
            return (*new_leaves, *aux_leaves)

        specs = [jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x))
                 for x in (*state_leaves, *input_leaves)]
        exported = export.export(jax.jit(flat_step), disabled_checks=[
            export.DisabledSafetyCheck.custom_call(t) for t in targets])(*specs)
        aux_tree = aux_holder[-1]
        for path, data in ((aux_path, aux_tree.serialize_using_proto()), (module_path, exported.serialize())):
            with atomic_output(path, replace=True) as temporary:  # the module last: it marks a complete entry
                temporary.write_bytes(data)
    compiled = jax.jit(exported.call, donate_argnums=tuple(range(num_state)) if donate_state else ())

    def call(state, *inputs):
        outputs = compiled(*jax.tree.leaves(state), *jax.tree.leaves(tuple(inputs)))
        return jax.tree.unflatten(state_tree, outputs[:num_state]), jax.tree.unflatten(aux_tree, outputs[num_state:])

    call.lower = lambda state, *inputs: compiled.lower(*jax.tree.leaves(state), *jax.tree.leaves(tuple(inputs)))
    return call, loaded
