"""What a model costs: parameters and multiply-accumulates (MACs) per stage, and attention's share.

    cbam_jax.summary("cbam_resnet50")     # or a model: summary(create_model(...))
    cbam-jax summary cbam_resnext50_32x4d --image-size 224

MACs are counted from the convolutions and dense layers the model actually runs (Flax method
interception under `jax.eval_shape`: nothing is computed or compiled), per image:
kh * kw * Cin / groups * Cout per output pixel, and Cin * Cout per dense call (CBAM's channel MLP
runs once per pooled descriptor, so it counts twice). BatchNorm, activations, pooling and the
gates' elementwise products are not counted, as in the CBAM paper's "GFLOPs", which are MACs.

Two conventions, which differ for bottleneck networks only:
- *model*: the network as built (stride on the bottleneck's 3x3, torchvision's "v1.5", the
  official CBAM code's): ResNet-50 4.09 G.
- *paper*: the stride on the bottleneck's first 1x1 convolution (the original ResNet), which is
  what the CBAM paper's Table 4 numbers match: ResNet-50 3.858 G. Only the strided block's 1x1
  conv changes (it then runs at the output resolution); the parameters are the same.
"""

import argparse
import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.traverse_util import flatten_dict

from cbam_jax.errors import InvalidInput
from cbam_jax.registry import Model, create_model

# Attention modules: per-block `attention`/`dw_attention`/`pw_attention` and BAM's `bam{S}`.
_ATTENTION = re.compile(r"(^|/)(\w*attention|bam\d+)(/|$)")
_STAGE = re.compile(r"^(?:layer|stage|bam)(\d+)")


@dataclasses.dataclass(frozen=True)
class Row:
    """One part of the model: 'stem', 'stage S' or 'head'."""

    part: str
    params: int
    attention_params: int
    macs: int  # the model as built
    paper_macs: int  # stride on the bottleneck's first 1x1 conv
    attention_macs: int


@dataclasses.dataclass(frozen=True)
class Summary:
    """Per-part rows and totals for one model at one input size."""

    name: str
    image_size: int
    rows: tuple[Row, ...]

    @property
    def total(self) -> Row:
        return Row("total", *(sum(getattr(r, f.name) for r in self.rows)
                              for f in dataclasses.fields(Row) if f.name != "part"))

    def format(self) -> str:
        """A plain-text table (M parameters, G MACs)."""
        lines = [f"{self.name} at {self.image_size}x{self.image_size}: parameters (M), MACs (G) as built and in the "
                 "CBAM paper's convention (stride on the bottleneck's first 1x1 conv)",
                 f"{'part':<8} {'params':>9} {'attn':>8} {'MACs':>8} {'paper':>8} {'attn':>7}"]
        for row in self.rows + (self.total,):
            lines.append(f"{row.part:<8} {row.params / 1e6:9.3f} {row.attention_params / 1e6:8.3f} "
                         f"{row.macs / 1e9:8.3f} {row.paper_macs / 1e9:8.3f} {row.attention_macs / 1e9:7.4f}")
        total = self.total
        lines.append(f"attention: {100 * total.attention_params / max(total.params, 1):.2f}% of the parameters, "
                     f"{100 * total.attention_macs / max(total.macs, 1):.2f}% of the MACs")
        return "\n".join(lines)


def _part(path: str) -> str:
    match = _STAGE.match(path)
    if match:
        return f"stage {match[1]}"
    return "head" if path.startswith("fc") else "stem"


def _order(part: str) -> tuple[int, int]:
    return (0, 0) if part == "stem" else (2, 0) if part == "head" else (1, int(part.split()[1]))


def summary(model_or_name: Model | str, *, image_size: int = 224, in_channels: int = 3) -> Summary:
    """Parameters and MACs of a model (or registered name, 1000 classes) for one image of
    `image_size` x `image_size` x `in_channels`, per part (stem, stages, head) and in total.

    E.g. summary('resnet50').total: 25,557,032 parameters, 4.089 G MACs as built, 3.858 G in the
    paper's convention.
    """
    model = create_model(model_or_name) if isinstance(model_or_name, str) else model_or_name
    if getattr(model, "features_only", False):
        raise InvalidInput("summary: give a classifier (features_only=False); a backbone has no head to count.")
    if not isinstance(image_size, int) or image_size < 8:
        raise InvalidInput(f"summary: image_size must be an integer >= 8; got {image_size!r}.")
    name = model_or_name if isinstance(model_or_name, str) else type(model).__name__
    x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    calls: list[dict[str, Any]] = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Conv, nn.Dense)):
            inputs = args[0]
            path = "/".join(module.scope.path)
            if isinstance(module, nn.Conv):
                kh, kw = module.kernel_size
                macs = int(np.prod(out.shape[1:-1])) * out.shape[-1] * kh * kw * inputs.shape[-1] \
                    // module.feature_group_count
            else:
                # All leading axes (batch 1): CBAM's MLP takes its descriptors stacked as (P, B, C).
                macs = int(np.prod(inputs.shape[:-1])) * inputs.shape[-1] * out.shape[-1]
            calls.append({"path": path, "macs": macs, "in_area": int(np.prod(inputs.shape[1:-1])),
                          "out_area": int(np.prod(out.shape[1:-1])), "kernel": tuple(module.kernel_size)
                          if isinstance(module, nn.Conv) else None})
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)

    # The paper's convention: in a bottleneck block whose 3x3 conv (conv2) strides, conv1 (1x1) strides instead.
    strided_blocks = {c["path"].rsplit("/", 1)[0]: c["out_area"] for c in calls
                      if c["path"].endswith("/conv2") and c["kernel"] == (3, 3) and c["out_area"] < c["in_area"]}
    parts: dict[str, dict[str, int]] = {}
    for call in calls:
        block, _, leaf = call["path"].rpartition("/")
        paper = call["macs"]
        if leaf == "conv1" and block in strided_blocks and any(
                c["path"] == f"{block}/conv3" for c in calls):  # bottlenecks only
            paper = call["macs"] * strided_blocks[block] // call["out_area"]
        part = parts.setdefault(_part(call["path"]), {"macs": 0, "paper_macs": 0, "attention_macs": 0,
                                                     "params": 0, "attention_params": 0})
        part["macs"] += call["macs"]
        part["paper_macs"] += paper
        if _ATTENTION.search(call["path"]):
            part["attention_macs"] += call["macs"]
    for path, leaf in flatten_dict(dict(variables["params"]), sep="/").items():
        part = parts.setdefault(_part(path), {"macs": 0, "paper_macs": 0, "attention_macs": 0,
                                             "params": 0, "attention_params": 0})
        part["params"] += int(np.prod(leaf.shape))
        if _ATTENTION.search(path):
            part["attention_params"] += int(np.prod(leaf.shape))
    rows = tuple(Row(part, **values) for part, values in sorted(parts.items(), key=lambda item: _order(item[0])))
    return Summary(name=name, image_size=image_size, rows=rows)


# --------------------------------------------------------------------------- the paper's tables

# The CBAM paper's Table 4 / 5 rows: registry name -> (params M, GFLOPs) as printed.
PAPER_ROWS: dict[str, tuple[float, float]] = {
    "resnet18": (11.69, 1.814), "se_resnet18": (11.78, 1.814), "cbam_resnet18": (11.78, 1.815),
    "resnet34": (21.80, 3.664), "se_resnet34": (21.96, 3.664), "cbam_resnet34": (21.96, 3.665),
    "resnet50": (25.56, 3.858), "se_resnet50": (28.09, 3.860), "cbam_resnet50": (28.09, 3.864),
    "resnet101": (44.55, 7.570), "se_resnet101": (49.33, 7.575), "cbam_resnet101": (49.33, 7.581),
    "wide_resnet18_1_5": (25.88, 3.866), "se_wide_resnet18_1_5": (26.07, 3.867),
    "cbam_wide_resnet18_1_5": (26.08, 3.868),
    "wide_resnet18_2": (45.62, 6.696), "se_wide_resnet18_2": (45.97, 6.696), "cbam_wide_resnet18_2": (45.97, 6.697),
    "resnext50_32x4d": (25.03, 3.768), "se_resnext50_32x4d": (27.56, 3.771), "cbam_resnext50_32x4d": (27.56, 3.774),
    "resnext101_32x4d": (44.18, 7.508), "se_resnext101_32x4d": (48.96, 7.512),
    "cbam_resnext101_32x4d": (48.96, 7.519),
    "mobilenet_w7d10": (2.30, 0.283), "se_mobilenet_w7d10": (2.71, 0.283), "cbam_mobilenet_w7d10": (2.71, 0.289),
    "mobilenet_w1": (4.23, 0.569), "se_mobilenet_w1": (5.07, 0.570), "cbam_mobilenet_w1": (5.07, 0.576),
}


def models_table(names: list[str] | None = None) -> str:
    """A Markdown table of the paper's Table 4/5 rows: cbam-jax's parameters and MACs beside the paper's."""
    lines = ["| model | params (M) | paper params (M) | MACs, paper convention (G) | paper GFLOPs | "
             "MACs as built (G) | attention params |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in names or list(PAPER_ROWS):
        total = summary(name).total
        paper_params, paper_flops = PAPER_ROWS[name]
        lines.append(f"| {name} | {total.params / 1e6:.2f} | {paper_params:.2f} | {total.paper_macs / 1e9:.3f} | "
                     f"{paper_flops:.3f} | {total.macs / 1e9:.3f} | {100 * total.attention_params / total.params:.2f}% |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- `cbam-jax summary`


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a registered model name (see cbam_jax.list_models()), e.g. cbam_resnext50_32x4d")
    parser.add_argument("--image-size", type=int, default=224, help="side of the square input (default 224)")
    parser.add_argument("--variant", default="official", help="attention options of 'official', 'timm' or 'common'")


def run(args: argparse.Namespace) -> int:
    model = create_model(args.model, variant=args.variant)
    print(summary(model, image_size=args.image_size).format().replace(type(model).__name__, args.model, 1))
    return 0
