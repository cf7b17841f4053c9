"""At the end of training: the best checkpoint's model as a pretrained directory `WORKDIR/pretrained/`
(`cbam_jax.pretrained` format), ready for `cbam-jax predict` / `cbam-jax attention` / `init_from`.

Its metadata records the class names and exactly the eval preprocessing of the config, so that
inference outside the training pipeline sees the inputs the model was evaluated on.
"""

import os
import shutil
from pathlib import Path

import ml_collections
from cbam_jax.pretrained import process_local_checkpointer, save_pretrained

PRETRAINED_DIR = "pretrained"


def eval_preprocessing(dataset: ml_collections.ConfigDict) -> dict:
    """The config's eval preprocessing in the metadata schema of `cbam_jax.predict.Preprocessing`.

    `eval_resize == 0` resizes the whole image to image_size x image_size (aspect not kept): a
    [height, width] `resize`; otherwise the short side goes to `eval_resize`, then a center crop.
    """
    size = dataset.image_size
    return {"resize": [size, size] if dataset.eval_resize <= 0 else dataset.eval_resize, "crop": size,
            "mean": [float(v) for v in dataset.mean], "std": [float(v) for v in dataset.std],
            "channels": dataset.channels}


def class_names(dataset: ml_collections.ConfigDict, source) -> list[str] | None:
    """Names of the classes in label order, None when the source does not say them cheaply."""
    if dataset.source == "digits":
        return [str(digit) for digit in range(10)]
    if dataset.source == "folder":
        return list(source.classes)
    try:  # tfds: the label feature of the prepared dataset's info, when it has names
        names = list(source.dataset_info.features["label"].names)
    except Exception:  # no info, no 'label' feature, or a feature without names
        return None
    return names if len(names) == dataset.num_classes else None


def _best_variables(workdir: Path) -> dict:
    """{'params', 'batch_stats'} of the best checkpoint (the latest periodic one if there is no best),
    read by this process alone."""
    for kind in ("best", "checkpoints"):
        folder = workdir / kind
        steps = sorted(int(name) for name in os.listdir(folder) if name.isdigit()) if folder.is_dir() else []
        if steps:
            state = process_local_checkpointer().restore(folder / str(steps[-1]) / "state")
            return {"params": state["params"], "batch_stats": state["batch_stats"]}
    raise FileNotFoundError(f"No checkpoint in {workdir}/best or {workdir}/checkpoints to export.")


def export_pretrained(workdir: str, model, dataset: ml_collections.ConfigDict, source) -> Path:
    """Write the best checkpoint's model to `workdir/pretrained/`, replacing an older export safely.

    The new directory is written completely under a temporary name, then swapped in: an
    interruption leaves either the old export or the new one (never a partial one) in place.

    Args:
      workdir: the training workdir (after all checkpoint saves have finished).
      model: the trained `ResNet`.
      dataset: the config's dataset group (for class names and preprocessing).
      source: the dataset's eval source (for class names).
    """
    workdir = Path(workdir)
    target = workdir / PRETRAINED_DIR
    staging, retired = workdir / f".{PRETRAINED_DIR}.new", workdir / f".{PRETRAINED_DIR}.old"
    if retired.exists() and not target.exists():  # interrupted between the two renames: put it back
        os.rename(retired, target)
    for leftover in (staging, retired):  # from an interrupted export
        shutil.rmtree(leftover, ignore_errors=True)
    metadata = {"preprocessing": eval_preprocessing(dataset), "source": f"cbam_jax training run in {workdir}"}
    names = class_names(dataset, source)
    if names is not None:
        metadata["class_names"] = names
    save_pretrained(staging, model, _best_variables(workdir), metadata=metadata)
    if target.exists():
        os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
    return target
