"""Models by name: `create_model('cbam_resnet50', variant='official')`.

Names are `{prefix}resnet{depth}` with prefix '' (plain), 'se_', 'cbam_' or 'bam_' and depth in
18, 34, 50, 101, 152. A *variant* sets the options that differ between the CBAM implementations
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

from typing import Any

import jax.numpy as jnp

from cbam_jax.errors import InvalidInput
from cbam_jax.layers.common import upgrade_renamed_options
from cbam_jax.resnet import ATTENTION_LAYERS, ResNet, attention_options, layer_options

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


def list_models() -> list[str]:
    """All registered model names, e.g. ['bam_resnet101', ..., 'se_resnet50']."""
    return sorted(f"{prefix}resnet{depth}" for prefix in PREFIXES for depth in DEPTHS)


def parse_name(name: str) -> tuple[str | None, int]:
    """Split a model name into (attention kind, depth); ValueError for an unknown name."""
    for prefix, attention in PREFIXES.items():
        for depth in DEPTHS:
            if name == f"{prefix}resnet{depth}":
                return attention, depth
    raise InvalidInput(f"Unknown model name {name!r}; available: {', '.join(list_models())}.")


def create_model(name: str, *, num_classes: int = 1000, stem: str = "imagenet", variant: str = "official",
                 **overrides: Any) -> ResNet:
    """Build a registered model (an uninitialised Flax module; `cbam_jax.create_model` also takes
    `pretrained=` for published weights).

    Args:
      name: e.g. 'cbam_resnet50', 'resnet18', 'se_resnet101', 'bam_resnet50' (see `list_models()`).
      num_classes: size of the head (0 = return pooled features).
      stem: 'imagenet' (7x7/2 conv + max-pool, for 224x224) or 'cifar' (3x3/1 conv, for 32x32).
      variant: 'official', 'timm' or 'common': the attention options of that source.
      **overrides: any `ResNet` field (dtype, param_dtype, bn_axis_name, width, features_only,
        out_indices, ...) or any option of the attention layer (reduction, kernel_size, pool_order, ...).

    Returns:
      A `ResNet`; `model.init(rng, x)` with x of shape (B, H, W, 3) gives its variables.

    Raises:
      ValueError: for an unknown name, variant, stem or override.
    """
    attention, depth = parse_name(name)
    overrides = upgrade_renamed_options(overrides, "create_model")
    if variant not in VARIANTS:
        raise InvalidInput(f"Unknown variant {variant!r}; available: {', '.join(VARIANTS)}.")
    if variant not in VARIANTS_OF_ATTENTION[attention]:
        raise InvalidInput(f"{name} exists only in the variant(s) {VARIANTS_OF_ATTENTION[attention]}; got {variant!r}.")
    block, stage_sizes = DEPTHS[depth]
    preset = VARIANTS[variant]
    model_fields = layer_options(ResNet) - {"stage_sizes", "block", "attention", "attention_options",
                                            "num_classes", "stem"}
    attention_fields = attention_options(ATTENTION_LAYERS[attention]) if attention else set()
    unknown = sorted(set(overrides) - model_fields - attention_fields)
    if unknown:
        raise InvalidInput(f"Unknown option(s) {unknown} for {name}; allowed: model options {sorted(model_fields)}"
                         + (f", attention options {sorted(attention_fields)}." if attention else "."))
    model_kwargs = {"zero_init_residual": preset["zero_init_residual"]}
    model_kwargs.update({k: v for k, v in overrides.items() if k in model_fields})
    options = dict(preset.get(attention, {})) if attention else {}
    options.update({k: v for k, v in overrides.items() if k in attention_fields})
    return ResNet(stage_sizes=stage_sizes, block=block, num_classes=num_classes, stem=stem, attention=attention,
                  attention_options=options, **model_kwargs)


def model_config(model: ResNet) -> dict[str, Any]:
    """The JSON-serialisable fields of `model` (dtypes by name); `model_from_config` inverts it."""
    config = {}
    for field in sorted(layer_options(ResNet)):
        value = getattr(model, field)
        if field in ("dtype", "param_dtype"):
            value = jnp.dtype(value).name
        elif field == "attention_options":
            value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
        elif isinstance(value, tuple):  # stage_sizes, out_indices
            value = list(value)
        config[field] = value
    return config


def model_from_config(config: dict[str, Any]) -> ResNet:
    """Rebuild a `ResNet` from `model_config(model)` (lists for tuples, dtype names for dtypes);
    ValueError for unknown or invalid fields. Configs saved under renamed option names (`kernels`,
    `spatial_bn`) are upgraded."""
    config = upgrade_renamed_options(config, "model config", warn=False)
    if "attention_options" in config:
        config["attention_options"] = upgrade_renamed_options(config["attention_options"], "model config", warn=False)
    unknown = sorted(set(config) - layer_options(ResNet))
    if unknown:
        raise InvalidInput(f"Unknown model config field(s) {unknown}; allowed: {sorted(layer_options(ResNet))}.")
    return ResNet(**config)  # its __post_init__ turns lists into tuples and dtype names into dtypes
