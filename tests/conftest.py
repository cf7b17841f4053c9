"""pytest fixtures shared by the tests; helper functions live in tests/helpers.py."""

import os
import sys

import numpy as np
import pytest


def pytest_configure(config):
    """Keep compiled XLA programs in pytest's cache folder (.pytest_cache/d/xla), so that a second
    run of the test loop skips most compilation (it dominates the suite's time on the CPU). The
    subprocesses the tests start (train.py, cbam-jax, benchmarks) share it through the environment:
    the many train.py runs of one small config compile its programs once. `pytest --cache-clear`
    starts afresh; `-p no:cacheprovider` runs without it."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return
    settings = {"jax_compilation_cache_dir": str(cache.mkdir("xla")),
                "jax_persistent_cache_min_compile_time_secs": 0,  # the many small programs too
                "jax_persistent_cache_min_entry_size_bytes": 0}
    # JAX reads these variables when it is imported; this process imports it later (an xdist
    # controller never: it starts its workers sooner), unless a plugin imported it already.
    os.environ.update({name.upper(): str(value) for name, value in settings.items()})
    if "jax" in sys.modules:
        for name, value in settings.items():
            sys.modules["jax"].config.update(name, value)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
