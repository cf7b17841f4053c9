"""At the end of training: the best checkpoint's model as a pretrained directory `WORKDIR/pretrained/`
(`cbam_jax.pretrained` format), ready for `cbam-jax predict` / `cbam-jax attention` / `init_from`.

Its metadata records the class names and exactly the eval preprocessing of the config, so that
inference outside the training pipeline sees the inputs the model was evaluated on.
"""

from pathlib import Path

import ml_collections

from cbam_jax.data import eval_preprocessing
from cbam_jax.pretrained import save_pretrained
from cbam_jax.training.checkpoint import restore_variables

PRETRAINED_DIR = "pretrained"


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


def export_pretrained(workdir: str, model, dataset: ml_collections.ConfigDict, source) -> Path:
    """Write the best checkpoint's model to `workdir/pretrained/`, replacing an older export safely.

    The new directory is written completely under a temporary name, then swapped in
    (`save_pretrained(..., overwrite=True)`): an interruption leaves either the old export or the
    new one (never a partial one) in place.

    Args:
      workdir: the training workdir (after all checkpoint saves have finished).
      model: the trained `ResNet`.
      dataset: the config's dataset group (for class names and preprocessing).
      source: the dataset's eval source (for class names).
    """
    metadata = {"preprocessing": eval_preprocessing(dataset).to_dict(),
                "source": f"cbam_jax training run in {Path(workdir)}"}
    names = class_names(dataset, source)
    if names is not None:
        metadata["class_names"] = names
    variables, _ = restore_variables(workdir, "best")
    return save_pretrained(Path(workdir) / PRETRAINED_DIR, model, variables, metadata=metadata, overwrite=True)
