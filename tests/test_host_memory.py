"""`use_huge_pages`: the program restarts once with glibc's huge-page tunable, and XLA:CPU's scratch memory then faults in 2 MiB at a time."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from cbam_jax import host_memory

# Calls use_huge_pages first (as train.py does), then runs a jitted call with 512 MiB of
# temporaries a few times; prints the tunables it ran with, how often the script started, and
# the minor page faults of each call after the first three (with MEASURE_FAULTS=0 it stops after
# the restart decision).
FAULTS_SCRIPT = """
import json, os, resource, sys
from cbam_jax import host_memory
starts = int(os.environ.get("STARTS", "0")) + 1
os.environ["STARTS"] = str(starts)  # seen by the restarted program
host_memory.use_huge_pages()
if os.environ.get("MEASURE_FAULTS") == "0":  # only whether the program restarted
    print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "starts": starts, "args": sys.argv[1:]}))
    sys.exit()
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
print(json.dumps({"tunables": os.environ.get("GLIBC_TUNABLES", ""), "starts": starts, "faults": faults,
                  "args": sys.argv[1:]}))
"""


def _run(*args: str, **env: str) -> dict:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("GLIBC_TUNABLES", "STARTS", host_memory.DISABLE_VARIABLE)}
    environment["JAX_PLATFORMS"] = "cpu"
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, *args], capture_output=True, text=True,
                          env=environment, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


needs_huge_pages = pytest.mark.skipif(not host_memory.huge_pages_possible(),
                                      reason="needs Linux, glibc 2.35+ and transparent huge pages (always or madvise)")


@pytest.mark.slow  # two subprocesses with 512 MiB of temporaries
@needs_huge_pages
def test_restart_with_huge_pages_cuts_page_faults():
    default = _run("--flag", "value with spaces", CBAM_JAX_HUGE_PAGES="0")
    huge = _run("--flag", "value with spaces")
    assert default["starts"] == 1 and default["tunables"] == ""
    # Restarted once, with the same arguments and the tunable.
    assert huge["starts"] == 2 and huge["tunables"] == host_memory.TUNABLE
    assert huge["args"] == default["args"] == ["--flag", "value with spaces"]
    # glibc maps and unmaps the 512 MiB of temporaries every call: ~131,000 faults of 4 KiB pages
    # with the defaults, ~256 of 2 MiB with huge pages (the median call).
    assert statistics.median(default["faults"]) > 30_000, default
    assert statistics.median(huge["faults"]) < statistics.median(default["faults"]) / 20, (huge, default)


@needs_huge_pages
@pytest.mark.parametrize("env", [  # a subprocess each (~2 s): one case fast
    {"CBAM_JAX_HUGE_PAGES": "0"},                  # the user said no
    pytest.param({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, marks=pytest.mark.slow),  # a hugetlb value chosen already
    pytest.param({"JAX_PLATFORMS": "cuda,cpu"}, marks=pytest.mark.slow),                 # JAX will use an accelerator
])
def test_no_restart_where_the_user_or_the_platform_says_no(env):
    result = _run(**env, MEASURE_FAULTS="0")
    assert result["starts"] == 1
    assert host_memory.TUNABLE not in result["tunables"].split(":")


def test_other_tunables_are_kept():
    environ = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0",
                                           "PATH": "/bin"})
    assert environ == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "PATH": "/bin"}
