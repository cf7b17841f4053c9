"""pytest fixtures shared by the tests; helper functions live in tests/helpers.py."""

import numpy as np
import pytest


def pytest_configure(config):
    """Keep compiled XLA programs in pytest's cache folder (.pytest_cache/d/xla), so that a second
    run of the test loop skips most compilation (it dominates the suite's time on the CPU).
    `pytest --cache-clear` starts afresh; `-p no:cacheprovider` runs without it."""
    cache = getattr(config, "cache", None)
    if cache is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache.mkdir("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the many small programs too
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
