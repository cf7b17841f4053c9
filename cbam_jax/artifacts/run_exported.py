"""Run an exported cbam-jax model with jax alone: `python run_exported.py ARTIFACT_DIR IMAGES.npy [--top-k 5]`.

IMAGES.npy holds images already resized and cropped to the model's input size, (B, H, W, C) or
(H, W, C): uint8 in [0, 255] or floats in [0, 1]. They are normalised with the mean and std of
artifact.json, then model.jax_export (serialized StableHLO) runs on them. Prints one JSON line per
image with its top-k classes (a detector's artifact: its detections, class, score and box in input
pixels; images fitted into the detector's square input beforehand). Needs only `jax` (which brings numpy): no Flax, no cbam-jax.
"""

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np


def load(artifact_dir: str | Path):
    """(exported function, metadata) of an artifact directory."""
    artifact_dir = Path(artifact_dir)
    metadata = json.loads((artifact_dir / "artifact.json").read_text())
    if "stablehlo" not in metadata.get("files", {}):
        raise ValueError(f"{artifact_dir} has no StableHLO file (exported with --formats onnx): run its "
                         f"{metadata.get('files', {}).get('onnx', 'model.onnx')} with onnxruntime, or export again "
                         "with --formats stablehlo.")
    exported = jax.export.deserialize(bytearray((artifact_dir / metadata["files"]["stablehlo"]).read_bytes()))
    return exported, metadata


def standardize(images: np.ndarray, preprocessing: dict | None) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] images -> float32 (x - mean) / std per channel.

    cbam_jax.images.normalize's arithmetic, restated: this script runs where cbam-jax is not installed."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    if preprocessing:
        x = (x - np.asarray(preprocessing["mean"], np.float32)) / np.asarray(preprocessing["std"], np.float32)
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("artifact_dir")
    parser.add_argument("images", help=".npy file of (B, H, W, C) or (H, W, C) images")
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args(argv)
    try:
        exported, metadata = load(args.artifact_dir)
        images = np.load(args.images, allow_pickle=False)
    except (OSError, KeyError, ValueError) as error:
        print(f"run_exported: error: {error}", file=sys.stderr)
        return 1
    if images.ndim == 3:
        images = images[None]
    outputs = exported.call(standardize(images, metadata.get("preprocessing")))
    names = metadata.get("class_names")
    if metadata.get("task") == "detection":  # decoded detections: the valid rows of each image
        found = {name: np.asarray(value) for name, value in outputs.items()}
        for boxes, scores, classes, valid in zip(found["boxes"], found["scores"], found["classes"], found["valid"]):
            print(json.dumps([{"index": int(c), "class": names[c] if names else str(int(c)), "score": float(s),
                               "box": [float(v) for v in b]} for b, s, c, v in zip(boxes, scores, classes, valid) if v]))
        return 0
    logits = np.asarray(outputs)
    probabilities = np.exp(logits - logits.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    for row in probabilities:
        top = np.argsort(-row)[:args.top_k]
        print(json.dumps([{"index": int(i), "class": names[i] if names else str(int(i)),
                           "probability": float(row[i])} for i in top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
