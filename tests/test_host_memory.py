"""`keep_freed_memory`: XLA:CPU's freed scratch memory stays mapped, so later steps do not page-fault it in again."""

import json
import os
import statistics
import subprocess
import sys

import pytest

# A jitted call with 512 MiB of temporaries, run a few times; prints whether keep_freed_memory
# applied and the minor page faults of each call after the first three.
FAULTS_SCRIPT = """
import json, resource, sys
import cbam_jax
applied = cbam_jax.keep_freed_memory() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp
a = jnp.ones((8192, 8), jnp.float32); b = jnp.ones((8, 8192), jnp.float32)
def product_extremes(a, b):
    product = a @ b  # a reversed copy and a reduction: XLA keeps both as temporaries (512 MiB)
    return product[::-1].max(axis=0) + product.min(axis=0)
f = jax.jit(product_extremes)
assert f.lower(a, b).compile().memory_analysis().temp_size_in_bytes >= 2**28
for _ in range(3):
    f(a, b).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "again": cbam_jax.keep_freed_memory()}))
"""

APPLIED_SCRIPT = """
import sys, cbam_jax
if sys.argv[1] == "started":
    import jax.numpy as jnp
    jnp.ones(3).block_until_ready()
print(cbam_jax.keep_freed_memory())
"""


def _run(script: str, arg: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    environment.pop("CBAM_JAX_KEEP_MEMORY", None)
    environment["JAX_PLATFORMS"] = "cpu"
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True, env=environment,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"),
                                reason="mallopt's arena settings are glibc's")


@glibc_only
def test_freed_scratch_memory_is_not_faulted_in_again():
    default = json.loads(_run(FAULTS_SCRIPT, "default"))
    kept = json.loads(_run(FAULTS_SCRIPT, "keep"))
    assert kept["applied"] is True and kept["again"] is True
    # glibc's defaults unmap the 512 MiB of temporaries after each call: up to ~130,000 faults of 4 KiB pages
    # to map it again (fewer with transparent huge pages); kept, it stays mapped.
    # The median call: an occasional call may still grow the heap.
    assert statistics.median(default["faults"]) > 30_000, default
    assert statistics.median(kept["faults"]) < statistics.median(default["faults"]) / 20, (kept, default)


@glibc_only
@pytest.mark.parametrize("arg, env", [
    ("started", {}),                                   # too late: XLA's threads have their arenas
    ("fresh", {"CBAM_JAX_KEEP_MEMORY": "0"}),          # the user said no
    ("fresh", {"MALLOC_ARENA_MAX": "4"}),              # the user tuned glibc's malloc already
    ("fresh", {"JAX_PLATFORMS": "cuda,cpu"}),          # JAX will compute on an accelerator
])
def test_keep_freed_memory_leaves_malloc_alone(arg, env):
    assert _run(APPLIED_SCRIPT, arg, **env) == "False"


@glibc_only
def test_keep_freed_memory_applies_before_jax_starts():
    assert _run(APPLIED_SCRIPT, "fresh") == "True"
