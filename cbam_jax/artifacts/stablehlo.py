"""The StableHLO artifact: `jax.export` of the inference function, serialized with its weights."""

from collections.abc import Callable, Sequence

import jax
import numpy as np

from cbam_jax.errors import ExportError


def export_stablehlo(apply: Callable[[jax.Array], jax.Array], spec: jax.ShapeDtypeStruct,
                     platforms: Sequence[str]) -> bytes:
    """Serialize `apply` (images (B, H, W, C) -> outputs) for inputs like `spec` (symbolic dimensions
    allowed), lowered for every platform in `platforms`."""
    try:
        exported = jax.export.export(jax.jit(apply), platforms=tuple(platforms))(spec)
    except Exception as error:  # shape polymorphism and lowering report many kinds of errors
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"jax.export cannot export the model for input {spec.shape}: {message}") from None
    return bytes(exported.serialize())


def run_stablehlo(data: bytes, images: np.ndarray) -> np.ndarray:
    """Deserialize an artifact and run it on `images` (what `run_exported.py` does with jax alone)."""
    return np.asarray(jax.export.deserialize(bytearray(data)).call(images))
