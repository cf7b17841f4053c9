"""The one cache root of cbam-jax: converted pretrained weights and compiled native kernels.

`$CBAM_JAX_CACHE`, else `~/.cache/cbam_jax`. Ground layer: imports only `errors`.
"""

import os
from pathlib import Path

from cbam_jax.errors import InvalidInput

CACHE_ENV = "CBAM_JAX_CACHE"
DEFAULT_CACHE = "~/.cache/cbam_jax"


def cache_root() -> Path:
    """`$CBAM_JAX_CACHE` (absolute), else ~/.cache/cbam_jax; need not exist yet.

    Raises `InvalidInput` (one line) when the path exists but is not a directory.
    """
    root = Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser().absolute()
    if root.exists() and not root.is_dir():
        raise InvalidInput(f"the cache root {root} (${CACHE_ENV}) is not a directory: point ${CACHE_ENV} at a "
                           f"directory, or unset it to use {DEFAULT_CACHE}")
    return root
