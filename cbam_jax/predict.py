"""`cbam-jax predict --pretrained DIR IMAGE...`: the top-k classes of images, and the loading of a
pretrained model with its preprocessing that `cbam-jax attention` shares.

The preprocessing is the one the weights were trained with, read from the model's saved metadata
(`"preprocessing": {"resize", "crop", "mean", "std"[, "channels"]}`), never guessed; it is applied by
`cbam_jax.images` (loading, resize, crop and normalisation shared with the training pipeline).
"""

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from cbam_jax import factory, hub, zoo
from cbam_jax.checks import NonFiniteWeights
from cbam_jax.errors import UsageError, UserError

# Re-exported: they lived here before cbam_jax.images, and users import them from here.
from cbam_jax.images import (  # noqa: F401
    InputError,
    Preprocessing,
    load_image,
    load_images,
    normalize,
    preprocess,
    resize_and_crop,
    same_shape_batches,
    to_model_channels,
)

DEFAULT_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A pretrained model with what inference needs from its metadata."""

    model: nn.Module
    variables: Any
    class_names: list[str]
    preprocessing: Preprocessing


def load_model(path: str | Path, preprocessing_overrides: Mapping[str, Any] | None = None, *,
               allow_nonfinite: bool = False) -> LoadedModel:
    """Load a `save_pretrained` directory (e.g. written by `cbam-jax convert`), a registered name
    ('cbam_resnet50', downloaded and cached once) or an 'hf-hub:ORG/NAME[@REV]' id, and its metadata.

    `preprocessing_overrides` (keys of `Preprocessing`, None values ignored) replace or supply the
    saved preprocessing. Weights holding NaN or inf are refused unless `allow_nonfinite`.

    Raises:
      InputError: the directory is missing or holds no model, or the preprocessing is incomplete.
    """
    try:
        kind = factory.source_kind(path)
    except ValueError as error:
        raise InputError(f"--pretrained {path}: {str(error).rstrip('.')}; pass a directory written by "
                         "`cbam-jax convert` or `cbam_jax.save_pretrained`.") from None
    if kind == "file":
        raise InputError(f"--pretrained {path}: a checkpoint file, not a model directory; convert it first "
                         "(`cbam-jax convert`), or pass a registered name or an hf-hub:ORG/NAME id.")
    try:
        model, variables, metadata = factory.load_with_metadata(path, allow_nonfinite=allow_nonfinite)
        metadata = metadata or {}
    except NonFiniteWeights as error:  # a model, but broken: the message says so
        raise InputError(f"--pretrained {path}: {error.for_option('--allow-nonfinite')}") from None
    except (zoo.DownloadError, hub.HubError) as error:  # says where to put the file by hand, or how to fetch it
        raise InputError(f"--pretrained {path}: {error}") from None
    except UserError as error:
        if kind != "directory":  # a registered name or a Hub id: the library's own one-line reason (e.g. the cache root)
            raise InputError(f"--pretrained {path}: {error}") from None
        raise InputError(f"--pretrained {path}: no cbam-jax model could be loaded from this directory "
                         f"({type(error).__name__}: {error}). Pass a directory written by `cbam-jax convert` "
                         "or `cbam_jax.save_pretrained`.") from None
    except Exception as error:  # any other failure here means the same thing to the user: no usable model
        raise InputError(f"--pretrained {path}: no cbam-jax model could be loaded from this directory "
                         f"({type(error).__name__}: {error}). Pass a directory written by `cbam-jax convert` "
                         "or `cbam_jax.save_pretrained`.") from error
    num_classes = getattr(model, "num_classes", 0)
    if getattr(model, "features_only", False):
        raise InputError(f"--pretrained {path}: a features_only backbone (it returns feature maps, not class "
                         "scores); predict and attention need class scores: use the full model.")
    if num_classes < 1:
        raise InputError(f"--pretrained {path}: the model has no classification head (num_classes=0); "
                         "predict and attention need class scores.")
    saved = dict(metadata.get("preprocessing") or {})
    saved.update({k: v for k, v in (preprocessing_overrides or {}).items() if v is not None})
    if not saved:
        raise InputError(f"--pretrained {path}: the model's metadata records no preprocessing; give it with "
                         "--resize, --crop, --mean and --std (ImageNet weights: --resize 256 --crop 224 "
                         "--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225).")
    preprocessing = Preprocessing.from_dict(saved, source=f"{path} preprocessing (metadata and options)")
    model_channels = variables["params"]["conv1"]["kernel"].shape[2]
    if preprocessing.channels != model_channels:
        raise InputError(f"--pretrained {path}: the model takes {model_channels}-channel images but the preprocessing "
                         f"gives {preprocessing.channels}; its metadata's preprocessing is wrong.")
    names = list(metadata.get("class_names") or [])
    if len(names) != num_classes:  # absent or inconsistent: number the classes
        names = [f"class {i}" for i in range(num_classes)]
    return LoadedModel(model, variables, names, preprocessing)


@functools.partial(jax.jit, static_argnums=0)
def _probabilities(model: nn.Module, variables: Any, images: jax.Array) -> jax.Array:
    return jax.nn.softmax(model.apply(variables, images, train=False), axis=-1)


def top_k(model: nn.Module, variables: Any, images: np.ndarray, k: int = DEFAULT_TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The `k` most probable classes of preprocessed images (B, H, W, C).

    Returns:
      (probabilities (B, k), class indices (B, k)), most probable first.
    """
    probabilities = np.asarray(_probabilities(model, variables, images))
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(probabilities, order, axis=-1), order


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> None:
    """--resize/--crop/--mean/--std: override or supply the preprocessing saved with the model."""
    group = parser.add_argument_group("preprocessing (default: as saved with the model)")
    group.add_argument("--resize", type=int, help="short side after resizing")
    group.add_argument("--crop", type=int, help="side of the center crop")
    group.add_argument("--mean", action=_ChannelValues, nargs="+", metavar="M",
                       help="channel means on the [0, 1] scale, one per channel (R G B, or one for a grey model)")
    group.add_argument("--std", action=_ChannelValues, nargs="+", metavar="S",
                       help="channel stds on the [0, 1] scale, one per channel (R G B, or one for a grey model)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="use weights holding NaN or inf (refused by default: such weights are broken)")


class _ChannelValues(argparse.Action):
    """`--mean 0.5` or `--mean 0.48 0.46 0.41`: the leading numbers; what follows them (the IMAGE
    arguments, as in `--std 0.2 0.2 0.2 photo.jpg`) goes to `trailing_images`, see `image_arguments`."""

    def __call__(self, parser, namespace, values, option_string=None):
        numbers = []
        for value in values:
            try:
                numbers.append(float(value))
            except ValueError:
                break
        if not numbers:
            parser.error(f"argument {option_string}: expected 1 or 3 numbers; got {values[0]!r}")
        setattr(namespace, self.dest, numbers)
        namespace.trailing_images = getattr(namespace, "trailing_images", []) + list(values[len(numbers):])


def image_arguments(args: argparse.Namespace) -> list[str]:
    """The IMAGE arguments of a command, including those that followed --mean/--std values."""
    images = list(args.images) + list(getattr(args, "trailing_images", []))
    if not images:
        raise UsageError("give at least one IMAGE file to read (e.g. photo.jpg).")
    return images


def preprocessing_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"resize": args.resize, "crop": args.crop, "mean": args.mean, "std": args.std}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    parser.add_argument("--pretrained", required=True, metavar="MODEL",
                        help="a model directory written by `cbam-jax convert` or save_pretrained, a registered "
                             "name (`cbam-jax list-pretrained`) or an hf-hub:ORG/NAME[@REV] id")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="classes to print per image (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (%(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image instead of text")
    add_preprocessing_arguments(parser)


def check_positive(args: argparse.Namespace, *options: str) -> None:
    """UsageError unless each integer option (attribute name) is >= 1."""
    for option in options:
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be >= 1; got {value}.")


def load_for_command(args: argparse.Namespace) -> LoadedModel:
    """`load_model` of --pretrained with the preprocessing options; a model that cannot be used is a
    UserError with exit code 2 (nothing was done)."""
    try:
        return load_model(args.pretrained, preprocessing_overrides(args), allow_nonfinite=args.allow_nonfinite)
    except InputError as error:
        raise UserError(str(error), exit_code=2) from None


def report_failures(program: str, failures: int, total: int, what: str = "could not be read") -> int:
    """The exit code of a command over `total` images: 1 if any failed (each was reported on its own
    line; a count follows when there were several images), else 0."""
    if failures and total > 1:
        print(f"{program}: error: {failures} of {total} image(s) {what} (see the lines above).", file=sys.stderr)
    return 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    """Print the top-k classes of every readable image; exit 1 if any image failed, 2 without a model."""
    check_positive(args, "top_k", "batch_size")
    args.images = image_arguments(args)
    loaded_model = load_for_command(args)
    items, failures = load_images(args.images, loaded_model.preprocessing, program="cbam-jax predict")
    k = min(args.top_k, len(loaded_model.class_names))
    for batch in same_shape_batches(items, args.batch_size):
        inputs = normalize(np.stack([image for _, image in batch]), loaded_model.preprocessing.mean,
                           loaded_model.preprocessing.std)
        probabilities, indices = top_k(loaded_model.model, loaded_model.variables, inputs, k)
        for (path, _), probs, classes in zip(batch, probabilities, indices):
            ranked = [{"index": int(c), "class": loaded_model.class_names[c], "probability": float(p)}
                      for p, c in zip(probs, classes)]
            if args.json:
                print(json.dumps({"image": path, "top_k": ranked}))
            else:
                print(path)
                for rank, entry in enumerate(ranked, 1):
                    print(f"  {rank}. {entry['probability']:.4f}  {entry['class']} ({entry['index']})")
    return report_failures("cbam-jax predict", failures, len(args.images))
