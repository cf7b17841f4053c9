"""The library's front door, composed from the layers below: models by name, with or without
published weights, and weights from any source.

    model = create_model("cbam_resnet50")                                  # an uninitialised Flax module
    model, variables = create_model("cbam_resnet50", pretrained=True)      # with the zoo's weights
    model, variables = load("hf-hub:ORG/NAME")                             # or a name, a folder, a .pth
    variables, report = init_from("resnet50.tv_in1k", create_model("cbam_resnet50"))  # a backbone transferred

`cbam_jax.registry` knows the names, `cbam_jax.zoo` the published files, `cbam_jax.hub` the Hub,
`cbam_jax.pretrained` the folders and `cbam_jax.convert` the PyTorch layouts; this module only
decides which of them a request needs (as timm's `_factory` does over `_builder`/`_hub`/`_registry`).
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax

from cbam_jax import hub, registry, zoo
from cbam_jax.convert import from_torch
from cbam_jax.convert.layouts import get_layout
from cbam_jax.convert.transfer import TransferReport, transfer_variables
from cbam_jax.errors import InvalidInput
from cbam_jax.pretrained import load_metadata, load_pretrained as load_folder
from cbam_jax.resnet import ATTENTION_LAYERS, ResNet, attention_options

SOURCE_KINDS = ("hub", "registry", "directory", "file")


def create_model(name: str, *, pretrained: bool | str = False, **kwargs: Any
                 ) -> ResNet | tuple[ResNet, dict[str, Any]]:
    """Build a registered model (an uninitialised Flax module), or with `pretrained` the model and its
    published weights.

    Args:
      name: e.g. 'cbam_resnet50', 'resnet18', 'se_resnet101', 'bam_resnet50' (see `list_models()`).
      pretrained: True for the model's default published ImageNet weights, or a tag of
        `cbam_jax.zoo.list_pretrained(name + '.*')` (e.g. 'official'); downloaded and converted once,
        then read from the cache (`cbam_jax.zoo`). A `num_classes` other than the weights' gets a new
        head (initialised with key 0); `features_only=True` drops the head. The model has the options
        of the published one (those of its PyTorch code, e.g. BatchNorm momentum), exactly as
        `cbam_jax.load(name)` gives it, unless `kwargs` set them.
      **kwargs: `cbam_jax.registry.create_model`'s: num_classes, stem, variant, and any `ResNet` field
        or attention option.

    Returns:
      A `ResNet`; `model.init(rng, x)` with x of shape (B, H, W, 3) gives its variables. With
      `pretrained`: `(model, variables)`, ready for `model.apply(variables, x)`.

    Raises:
      ValueError: for an unknown name, variant, stem, override or pretrained tag, or weights that do
        not fit the requested model (another stem or width).
      cbam_jax.zoo.DownloadError: the weights are not cached and cannot be downloaded.
    """
    if pretrained is False or pretrained is None:
        return registry.create_model(name, **kwargs)
    entry = zoo.get(name, pretrained if isinstance(pretrained, str) else None)
    model = registry.create_model(name, **{**_published_options(name, entry, kwargs), **kwargs})
    return model, zoo.pretrained_variables(name, pretrained, model)


def _published_options(name: str, entry: zoo.Pretrained, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The attention options in which the entry's PyTorch code differs from its variant's preset (as the
    converter applies them), when the model asked for is of that variant."""
    attention, _ = registry.parse_name(name)
    layout = get_layout(entry.layout)
    if attention is None or kwargs.get("variant", "official") != layout.variant:
        return {}
    allowed = attention_options(ATTENTION_LAYERS[attention])
    return {k: v for k, v in layout.attention_overrides.items() if k in allowed}


def source_kind(source: str | os.PathLike) -> str:
    """Which of SOURCE_KINDS the weights `source` are, checked without reading or downloading anything:
    an 'hf-hub:ORG/NAME[@REVISION]' id (its syntax), a registered name ('cbam_resnet50',
    'resnet50.tv_in1k'), an existing directory or an existing (checkpoint) file.

    Raises:
      ValueError: `source` is none of these; one line saying what would be.
    """
    text = os.fspath(source)
    if hub.is_hub_id(text):
        hub.parse_hub_id(text)
        return "hub"
    if text in zoo.PRETRAINED or any(entry.arch == text for entry in zoo.PRETRAINED.values()):
        return "registry"
    path = Path(text).expanduser()
    if path.is_dir():
        return "directory"
    if path.is_file():
        return "file"
    if any(entry.arch == text.partition(".")[0] for entry in zoo.PRETRAINED.values()):
        try:
            zoo.get(text)
        except ValueError as error:  # a known architecture with another tag: its tags
            raise InvalidInput(f"{str(error).rstrip('.')} ({text!r} is no directory or file either).") from None
    raise InvalidInput(f"{text!r} is no registered pretrained model (`cbam-jax list-pretrained`), no 'hf-hub:ORG/NAME' "
                       "id, and no existing directory or checkpoint file.")


def load(source: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[ResNet, dict[str, Any]]:
    """(model, variables) from any source of weights: a registered name ('cbam_resnet50',
    'resnet50.tv_in1k'), an 'hf-hub:ORG/NAME[@REVISION]' id, a pretrained folder, or a PyTorch
    checkpoint file (.pth, .pth.tar, .pt, .bin, .safetensors).

    Raises:
      ValueError: `source` is none of these (or does not load); DownloadError as `zoo.load_entry`.
    """
    model, variables, _ = load_with_metadata(source, allow_nonfinite=allow_nonfinite)
    return model, variables


def load_with_metadata(source: str | os.PathLike, *, allow_nonfinite: bool = False
                       ) -> tuple[ResNet, dict[str, Any], dict[str, Any]]:
    """(model, variables, metadata) from any source `load` takes: the one loader of the commands that take
    a model (`cbam-jax predict`, `attention`, `eval --pretrained`, `export`) and of training's `init_from`.
    The metadata (class names, preprocessing, source: `cbam_jax.pretrained`'s conventions) is that saved
    with the model; {} for a PyTorch checkpoint file. Weights holding NaN or inf are refused
    (`NonFiniteWeights`) unless `allow_nonfinite`.
    """
    kind = source_kind(source)
    text = os.fspath(source)
    if kind == "registry":
        entry = zoo.get(text)
        model, variables = zoo.load_entry(entry)
        return model, variables, load_metadata(zoo.model_dir(entry))
    if kind == "file":
        model, variables = from_torch(Path(text).expanduser(), allow_nonfinite=allow_nonfinite)
        return model, variables, {}
    folder = hub.folder_of(text) if kind == "hub" else Path(text).expanduser()
    model, variables = load_folder(folder, allow_nonfinite=allow_nonfinite)
    return model, variables, load_metadata(folder)


def load_pretrained(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[ResNet, dict[str, Any]]:
    """`(model, variables)` from a pretrained folder (`save_pretrained`, `cbam-jax convert`) or a Hugging
    Face Hub repository 'hf-hub:ORG/NAME[@REVISION]' (`cbam_jax.hub`); see `cbam_jax.pretrained.load_pretrained`.
    """
    return load_folder(hub.folder_of(path), allow_nonfinite=allow_nonfinite)


def init_from(source: str | os.PathLike, model: ResNet, *, rng: jax.Array | None = None,
              initial: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], TransferReport]:
    """Initial variables for `model` from pretrained weights, whatever their form.

    `source` is anything `load` takes. Backbone tensors must all be there; attention the source lacks
    (a plain ResNet) and a head of another class count are initialised as `model.init` does (or taken
    from `initial`, the caller's own init of `model`). This is what training's `init_from` calls; the
    report's `new` paths are the parameters a separate learning rate would apply to.

    Returns:
      (variables, report), as `cbam_jax.convert.transfer.transfer_variables`.
    """
    _, variables = load(source)
    return transfer_variables(variables, model, rng=rng, initial=initial)
