"""The export's self-check: an artifact's output against the model's, relative to the output's scale."""

import numpy as np

from cbam_jax.errors import ExportError


def check_close(what: str, actual: np.ndarray, expected: np.ndarray, tolerance: float) -> None:
    """Raise ExportError unless max |actual - expected| <= `tolerance` x max(1, max |expected|).

    `what` names the output in the message, e.g. "StableHLO artifact's output".
    """
    expected = np.asarray(expected)
    scale = max(1.0, float(np.max(np.abs(expected))))
    error = float(np.max(np.abs(np.asarray(actual) - expected)))
    if not error <= tolerance * scale:  # `not <=`: a NaN error fails too
        raise ExportError(f"the {what} differs from the model's by {error:.3g} (> {tolerance:g} x its scale "
                          f"{scale:.3g}); this is a bug in the export, please report it.")
