"""The rows of the CBAM paper's ablation (Sec. 4.1, Tables 1-3) as one recipe.

    python train.py --config configs/ablation.py:parallel --workdir runs/ablation/parallel
    python train.py --config configs/ablation.py:conv1x1_k7,base=cifar10 --workdir runs/c10_conv1x1_k7

The text after the colon (ml_collections' config argument) is `ROW` or `ROW,base=RECIPE`: the
row's attention options on top of `configs/RECIPE.py` (default: `default`, a width-16 CBAM-ResNet-18
on the embedded digits). The row sets the model family (plain ResNet or CBAM-ResNet of the base
recipe's depth) and `model.attention_options`; everything else comes from the base recipe and
`--config.FIELD=VALUE` overrides. `python -m benchmarks.ablation` trains every row for several seeds
and tabulates them beside the paper's ImageNet numbers.

Rows (the paper used ResNet-50 on ImageNet; "channel" = CBAM's channel gate alone):
  Table 1, channel descriptor:  resnet, channel_avg (= SE), channel_max, channel_avgmax
  Table 2, spatial descriptor:  conv1x1_k3, conv1x1_k7, pool_k3, cbam (= pooling, k = 7)
  Table 3, arrangement:         cbam (channel first), spatial_first, parallel
"""

import os

from cbam_jax.registry import parse_name
from cbam_jax.training.config import load_config, validate


def _channel_only(*pools: str) -> tuple[str, dict]:
    return "cbam", {"use_spatial": False, "pool_types": pools}


def _cbam(descriptor: str = "pool", kernel_size: int = 7, arrangement: str = "channel_first") -> tuple[str, dict]:
    return "cbam", {"pool_types": ("avg", "max"), "spatial_descriptor": descriptor, "kernel_size": kernel_size,
                    "arrangement": arrangement}


# row -> (attention kind, attention options). CBAM rows spell out every ablated option, so that a
# row means the same whatever the base recipe sets.
ROWS: dict[str, tuple[str | None, dict]] = {
    "resnet": (None, {}),
    "channel_avg": _channel_only("avg"),
    "channel_max": _channel_only("max"),
    "channel_avgmax": _channel_only("avg", "max"),
    "conv1x1_k3": _cbam("conv1x1", kernel_size=3),
    "conv1x1_k7": _cbam("conv1x1", kernel_size=7),
    "pool_k3": _cbam("pool", kernel_size=3),
    "cbam": _cbam(),
    "spatial_first": _cbam(arrangement="spatial_first"),
    "parallel": _cbam(arrangement="parallel"),
}


def parse_argument(argument: str | None) -> tuple[str, str]:
    """'ROW' or 'ROW,base=RECIPE' -> (row, recipe); ValueError naming the allowed values."""
    row, _, rest = (argument or "cbam").partition(",")
    base = "default"
    if rest:
        key, _, base = rest.partition("=")
        if key != "base" or not base or "," in base:
            raise ValueError(f"configs/ablation.py takes 'ROW' or 'ROW,base=RECIPE'; got {argument!r}.")
    if row not in ROWS:
        raise ValueError(f"configs/ablation.py: unknown row {row!r}; rows: {', '.join(ROWS)}.")
    return row, base


def get_config(argument: str | None = None):
    row, base = parse_argument(argument)
    config = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{base}.py"))
    _, depth = parse_name(config.model.name)
    kind, options = ROWS[row]
    with config.unlocked():
        config.model.name = f"{kind}_resnet{depth}" if kind else f"resnet{depth}"
        config.model.attention_options = dict(options)
    return validate(config)
