"""Models by name: `create_model('cbam_resnet50', variant='official')`.

Names are `{prefix}{architecture}` with prefix '' (plain), 'se_', 'cbam_' or 'bam_' (see
`ARCHITECTURES`): `resnet{18,34,50,101,152}`; the ResNeXts `resnext50_32x4d`, `resnext101_32x4d`
(the CBAM paper's), `resnext101_32x8d`, `resnext101_64x4d`; torchvision's Wide ResNets
`wide_resnet50_2`, `wide_resnet101_2` (bottleneck inner width doubled); the CBAM paper's
WideResNet-18 `wide_resnet18_1_5` and `wide_resnet18_2` (basic blocks, stage widths x1.5 / x2, stem
kept at 64); and MobileNet v1 `mobilenet_w1`, `mobilenet_w3d4`, `mobilenet_w7d10` (the paper's
alpha 0.7), `mobilenet_wd2`, `mobilenet_wd4` (no BAM: its place in a MobileNet is not defined).
A *variant* sets the options that differ between the CBAM implementations
in the wild, so that their checkpoints load exactly (facts: docs in README, "Variants"):

| option                | official (Jongchan) | timm                | common ("blog") |
|-----------------------|---------------------|---------------------|-----------------|
| MLP bias              | yes                 | no                  | no              |
| spatial pool order    | max, mean           | mean, max           | mean, max       |
| spatial BatchNorm     | yes, momentum 0.01* | yes, momentum 0.1*  | none            |
| spatial BN scale init | 0                   | 1                   | -               |
| last-BN zero init     | no                  | yes                 | no              |
(* PyTorch momentum; Flax momentum is 1 - m.)
"""

import fnmatch
from typing import Any

import jax.numpy as jnp

from cbam_jax.errors import InvalidInput
from cbam_jax.mobilenet import MobileNet
from cbam_jax.resnet import ATTENTION_LAYERS, ResNet, attention_options, layer_options

Model = ResNet | MobileNet
# family name (a model config's "family"; ResNet configs leave it out) -> module class
FAMILIES: dict[str, type[ResNet] | type[MobileNet]] = {"resnet": ResNet, "mobilenet": MobileNet}

# depth -> (block, blocks per stage)
DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# name prefix -> attention kind
PREFIXES: dict[str, str | None] = {"": None, "se_": "se", "cbam_": "cbam", "bam_": "bam"}


def _resnet(depth: int, **options: Any) -> dict[str, Any]:
    block, stage_sizes = DEPTHS[depth]
    return {"family": "resnet", "block": block, "stage_sizes": stage_sizes, **options}


# architecture (a name without its attention prefix) -> family and the module's fixed fields.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    **{f"resnet{depth}": _resnet(depth) for depth in DEPTHS},
    "resnext50_32x4d": _resnet(50, groups=32, base_width=4),
    "resnext101_32x4d": _resnet(101, groups=32, base_width=4),
    "resnext101_32x8d": _resnet(101, groups=32, base_width=8),
    "resnext101_64x4d": _resnet(101, groups=64, base_width=4),
    "wide_resnet50_2": _resnet(50, base_width=128),
    "wide_resnet101_2": _resnet(101, base_width=128),
    # The CBAM paper's WideResNet-18: stem at `width` (64), stage widths k * width * 2**s, i.e.
    # (96, 192, 384, 768) for k = 1.5 (25.88 M params) and (128, ..., 1024) for k = 2 (45.62 M).
    "wide_resnet18_1_5": _resnet(18, widen_factor=1.5),
    "wide_resnet18_2": _resnet(18, widen_factor=2.0),
    # pytorchcv's names; w7d10 is the paper's alpha 0.7.
    "mobilenet_w1": {"family": "mobilenet", "width_multiplier": 1.0},
    "mobilenet_w3d4": {"family": "mobilenet", "width_multiplier": 0.75},
    "mobilenet_w7d10": {"family": "mobilenet", "width_multiplier": 0.7},
    "mobilenet_wd2": {"family": "mobilenet", "width_multiplier": 0.5},
    "mobilenet_wd4": {"family": "mobilenet", "width_multiplier": 0.25},
}
# family -> the attention kinds it has (BAM's place in a MobileNet is not defined).
ATTENTION_OF_FAMILY: dict[str, tuple[str | None, ...]] = {
    "resnet": (None, "se", "cbam", "bam"), "mobilenet": (None, "se", "cbam"),
}

# variant -> ResNet fields and per-attention-kind layer options.
VARIANTS: dict[str, dict[str, Any]] = {
    "official": {
        "zero_init_residual": False,
        "cbam": {"mlp_bias": True, "pool_order": "max_mean", "spatial_use_bn": True,
                 "spatial_bn_momentum": 0.99, "spatial_bn_zero_init": True},
    },
    "timm": {
        "zero_init_residual": True,
        "cbam": {"mlp_bias": False, "pool_order": "mean_max", "spatial_use_bn": True,
                 "spatial_bn_momentum": 0.9, "spatial_bn_zero_init": False},
    },
    "common": {
        "zero_init_residual": False,
        "cbam": {"mlp_bias": False, "pool_order": "mean_max", "spatial_use_bn": False},
    },
}
# Only the official code has BAM. timm's SE rounds its hidden width up to a multiple of 8
# (C // 16 here, as Hu et al.), so timm SE checkpoints are not supported.
VARIANTS_OF_ATTENTION: dict[str | None, tuple[str, ...]] = {
    None: tuple(VARIANTS), "se": ("official",), "cbam": tuple(VARIANTS), "bam": ("official",),
}


def list_models(pattern: str | None = None) -> list[str]:
    """All registered model names, e.g. ['bam_resnet101', ..., 'se_wide_resnet50_2'], or those
    matching the shell-style `pattern` (e.g. '*resnext*')."""
    names = sorted(f"{prefix}{arch}" for arch, spec in ARCHITECTURES.items() for prefix, attention in PREFIXES.items()
                   if attention in ATTENTION_OF_FAMILY[spec["family"]])
    return names if pattern is None else fnmatch.filter(names, pattern)


def split_name(name: str) -> tuple[str | None, str]:
    """Split a model name into (attention kind, architecture): ('cbam', 'resnext50_32x4d');
    InvalidInput for an unknown name."""
    for prefix, attention in PREFIXES.items():
        arch = name[len(prefix):]
        if (name.startswith(prefix) and arch in ARCHITECTURES and (prefix or name == arch)
                and attention in ATTENTION_OF_FAMILY[ARCHITECTURES[arch]["family"]]):
            return attention, arch
    raise InvalidInput(f"Unknown model name {name!r}; available: {', '.join(list_models())}.")


def parse_name(name: str) -> tuple[str | None, int | str]:
    """Split a model name into (attention kind, depth) for the ResNets ('cbam_resnet50' -> ('cbam', 50)),
    (attention kind, architecture) for the other families; InvalidInput for an unknown name."""
    attention, arch = split_name(name)
    return attention, int(arch[len("resnet"):]) if arch[len("resnet"):].isdigit() and arch.startswith("resnet") else arch


def architecture_of(model: Model) -> tuple[str, dict[str, Any]]:
    """The registered architecture a model's fixed fields match and the `create_model` overrides
    that rebuild it from there: ('resnext50_32x4d', {}) or ('resnet50', {'groups': 4}) for a
    ResNet-50 with a cardinality no name has. InvalidInput for stages no name has."""
    family = next(name for name, cls in FAMILIES.items() if isinstance(model, cls))
    if family == "mobilenet":
        for arch, spec in ARCHITECTURES.items():
            if spec["family"] == family and spec["width_multiplier"] == model.width_multiplier:
                return arch, {}
        raise InvalidInput(f"No registered MobileNet has width_multiplier {model.width_multiplier}.")
    found = {"block": model.block, "stage_sizes": tuple(model.stage_sizes), "groups": model.groups,
             "base_width": model.base_width, "stage_widths": model.stage_widths}
    fallback = None
    for arch, spec in ARCHITECTURES.items():
        if spec["family"] != family or (spec["block"], spec["stage_sizes"]) != (model.block, found["stage_sizes"]):
            continue
        widen = spec.get("widen_factor")
        expected = {**RESNET_FIELDS_AT_DEFAULT_OMITTED, **{k: v for k, v in spec.items() if k in found}}
        if widen is not None:
            expected["stage_widths"] = tuple(int(model.width * widen * 2**s) for s in range(len(spec["stage_sizes"])))
        if all(found[k] == v for k, v in expected.items()):
            return arch, {}
        if arch.startswith("resnet"):
            fallback = arch
    if fallback is None:
        raise InvalidInput(f"No registered ResNet has {model.block} blocks per stage {list(model.stage_sizes)}.")
    return fallback, {k: v for k, v in found.items()
                      if k in RESNET_FIELDS_AT_DEFAULT_OMITTED and v != RESNET_FIELDS_AT_DEFAULT_OMITTED[k]}


def create_model(name: str, *, num_classes: int = 1000, stem: str = "imagenet", variant: str = "official",
                 **overrides: Any) -> Model:
    """Build a registered model (an uninitialised Flax module; `cbam_jax.create_model` also takes
    `pretrained=` for published weights).

    Args:
      name: e.g. 'cbam_resnet50', 'resnet18', 'se_resnext50_32x4d', 'cbam_mobilenet_w1' (see `list_models()`).
      num_classes: size of the head (0 = return pooled features).
      stem: 'imagenet' (7x7/2 conv + max-pool, for 224x224) or 'cifar' (3x3/1 conv, for 32x32).
      variant: 'official', 'timm' or 'common': the attention options of that source.
      **overrides: any `ResNet` (or `MobileNet`) field but those the name fixes (dtype, param_dtype,
        bn_axis_name, width, features_only, out_indices, ...) or any option of the attention layer
        (reduction, kernel_size, pool_order, ...).

    Returns:
      A `ResNet` (a `MobileNet` for 'mobilenet_*'); `model.init(rng, x)` with x of shape (B, H, W, 3)
      gives its variables.

    Raises:
      ValueError: for an unknown name, variant, stem or override.
    """
    attention, arch = split_name(name)
    if variant not in VARIANTS:
        raise InvalidInput(f"Unknown variant {variant!r}; available: {', '.join(VARIANTS)}.")
    if variant not in VARIANTS_OF_ATTENTION[attention]:
        raise InvalidInput(f"{name} exists only in the variant(s) {VARIANTS_OF_ATTENTION[attention]}; got {variant!r}.")
    fixed = dict(ARCHITECTURES[arch])
    model_cls = FAMILIES[fixed.pop("family")]
    widen_factor = fixed.pop("widen_factor", None)
    preset = VARIANTS[variant]
    model_fields = layer_options(model_cls) - set(fixed) - {"attention", "attention_options", "num_classes", "stem"}
    if widen_factor is not None:
        model_fields.discard("stage_widths")
    attention_fields = attention_options(ATTENTION_LAYERS[attention]) if attention else set()
    unknown = sorted(set(overrides) - model_fields - attention_fields)
    if unknown:
        raise InvalidInput(f"Unknown option(s) {unknown} for {name}; allowed: model options {sorted(model_fields)}"
                         + (f", attention options {sorted(attention_fields)}." if attention else "."))
    model_kwargs = {k: v for k, v in preset.items() if k in model_fields}  # zero_init_residual (ResNets)
    model_kwargs.update({k: v for k, v in overrides.items() if k in model_fields})
    options = dict(preset.get(attention, {})) if attention else {}
    options.update({k: v for k, v in overrides.items() if k in attention_fields})
    if widen_factor is not None:
        width = model_kwargs.get("width", 64)
        fixed["stage_widths"] = tuple(int(width * widen_factor * 2**s) for s in range(len(fixed["stage_sizes"])))
    return model_cls(num_classes=num_classes, stem=stem, attention=attention, attention_options=options,
                     **fixed, **model_kwargs)


# ResNet fields added with the ResNeXts and Wide ResNets, left out of a config at their defaults so
# that the configs of plain ResNets (and their saved checkpoints' architecture) stay as they were.
RESNET_FIELDS_AT_DEFAULT_OMITTED = {"groups": 1, "base_width": 64, "stage_widths": None}
# Likewise `remat` (how the backward pass is computed, not what the model is).
CONFIG_FIELDS_AT_DEFAULT_OMITTED = {**RESNET_FIELDS_AT_DEFAULT_OMITTED, "remat": "none"}


def model_config(model: Model) -> dict[str, Any]:
    """The JSON-serialisable fields of `model` (dtypes by name); `model_from_config` inverts it.

    A MobileNet's config says `"family": "mobilenet"`; a ResNet's has no family (configs written
    before there were other families are ResNets).
    """
    family = next(name for name, cls in FAMILIES.items() if isinstance(model, cls))
    config: dict[str, Any] = {} if family == "resnet" else {"family": family}
    for field in sorted(layer_options(type(model))):
        value = getattr(model, field)
        if family == "resnet" and CONFIG_FIELDS_AT_DEFAULT_OMITTED.get(field, ...) == value:
            continue
        if field in ("dtype", "param_dtype"):
            value = jnp.dtype(value).name
        elif field == "attention_options":
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
        elif isinstance(value, tuple):  # stage_sizes, stage_widths, out_indices
            value = list(value)
        config[field] = value
    return config


def model_from_config(config: dict[str, Any]) -> Model:
    """Rebuild a `ResNet` or `MobileNet` from `model_config(model)` (lists for tuples, dtype names
    for dtypes); ValueError for unknown or invalid fields."""
    config = dict(config)
    family = config.pop("family", "resnet")
    if family not in FAMILIES:
        raise InvalidInput(f"Unknown model family {family!r} in the model config; known: {', '.join(FAMILIES)}.")
    model_cls = FAMILIES[family]
    unknown = sorted(set(config) - layer_options(model_cls))
    if unknown:
        raise InvalidInput(f"Unknown model config field(s) {unknown}; allowed: {sorted(layer_options(model_cls))}.")
    return model_cls(**config)  # its __post_init__ turns lists into tuples and dtype names into dtypes
