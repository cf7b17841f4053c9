"""Which model a state_dict holds: source layout, depth, stem, attention, variant, classes, widths.

Detection works on Flax-side names and shapes: the state_dict's keys are first mapped through their
layout's rules, so one set of rules below serves every source (and `to_torch` reuses it on Flax
variables directly).
"""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from cbam_jax import registry
from cbam_jax.convert.layout import Layout
from cbam_jax.convert.layouts import LAYOUTS, get_layout
from cbam_jax.convert.reading import ConversionError
from cbam_jax.mobilenet import mobilenet_channels
from cbam_jax.resnet import ATTENTION_LAYERS, ResNet, layer_options

STEM_OF_KERNEL = {7: "imagenet", 3: "cifar"}
# Flax leaf paths whose shapes tell the attention hyper-parameters: (C, C // reduction) kernels.
REDUCTION_KERNELS = {
    "cbam": "params/layer1_0/attention/channel/fc1/kernel",
    "se": "params/layer1_0/attention/fc1/kernel",
    "bam": "params/bam1/channel_fc1/kernel",
}
SPATIAL_KERNEL = "params/layer1_0/attention/spatial/conv/kernel"


@dataclasses.dataclass(frozen=True)
class Detected:
    """A detected (or requested) model: `build()` gives the `ResNet` the weights load into."""

    layout: str
    arch: str
    variant: str
    stem: str
    num_classes: int
    options: Mapping[str, Any]  # create_model overrides: width, reduction, kernel_size, ...

    def build(self) -> ResNet:
        return registry.create_model(self.arch, num_classes=self.num_classes, stem=self.stem,
                                     variant=self.variant, **self.options)

    def describe(self) -> str:
        options = "".join(f", {k}={v!r}" for k, v in sorted(self.options.items()))
        return (f"{self.arch} (variant {self.variant!r}, stem {self.stem!r}, num_classes={self.num_classes}"
                f"{options}; PyTorch layout {self.layout!r})")


def detect_layout(keys: list[str]) -> Layout:
    """The first layout whose signature a key carries; ConversionError (with a hint) if none does."""
    for layout in LAYOUTS.values():
        if layout.matches(keys):
            return layout
    _raise_if_prefixed(keys)
    known = "; ".join(f"{layout.name}: {layout.description}" for layout in LAYOUTS.values())
    raise ConversionError(f"No known PyTorch ResNet layout matches this state_dict (first keys: {keys[:4]}). "
                          f"Known layouts: {known}.")


def _raise_if_prefixed(keys: list[str]) -> None:
    """ConversionError naming the prefix if the keys are a known layout under an unknown common prefix."""
    prefix = _common_prefix(keys)
    if prefix and any(layout.matches([k[len(prefix):] for k in keys]) for layout in LAYOUTS.values()):
        raise ConversionError(f"Every key starts with the unknown prefix {prefix!r} (e.g. {keys[0]!r}). If it is a "
                              f"wrapper, strip it: from_torch(..., strip_prefix={prefix!r}) or "
                              f"`cbam-jax convert --strip-prefix {prefix}`.")


def flax_shapes(state: Mapping[str, np.ndarray], layout: Layout) -> dict[str, tuple[int, ...]]:
    """Flax leaf path ('params/layer1_0/conv1/kernel') -> Flax shape for every key the layout maps."""
    shapes = {}
    for key, value in state.items():
        torch_module, _, torch_name = key.rpartition(".")
        found = layout.flax_module(torch_module)
        if found is None:
            continue
        flax_module, kind = found
        for leaf, tensor in kind.tensors.items():
            if tensor.torch_name == torch_name:
                collection = "batch_stats" if leaf in ("mean", "var") else "params"
                try:
                    shapes[f"{collection}/{flax_module}/{leaf}"] = tensor.to_flax(_shape_only(value.shape)).shape
                except ValueError:  # wrong rank: reported with both shapes when the weights are loaded
                    pass
    return shapes


def infer_model(shapes: Mapping[str, tuple[int, ...]], *, layout: str, variant: str | None = None,
                arch: str | None = None) -> Detected:
    """The model whose Flax variables have `shapes`; `arch`/`variant` replace what is detected."""
    source = get_layout(layout)
    variant = variant or source.variant
    stem_kernel = shapes.get("params/conv1/kernel")
    if stem_kernel is None or len(stem_kernel) != 4:
        raise ConversionError(f"No stem convolution found (for layout {layout!r} the key "
                              f"{source.torch_module('conv1')[0]}.weight); this is not a ResNet checkpoint.")
    if stem_kernel[0] not in STEM_OF_KERNEL:
        raise ConversionError(f"Stem convolution of size {stem_kernel[0]}x{stem_kernel[1]}: only 7x7 (ImageNet) "
                              "and 3x3 (CIFAR) stems exist.")
    stem, width = STEM_OF_KERNEL[stem_kernel[0]], stem_kernel[3]
    options: dict[str, Any] = {}
    attention = _detect_attention(shapes)
    if "params/stage1_0/dw_conv/kernel" in shapes:  # a MobileNet: its 3x3 stem is strided (no 'cifar' sign)
        stem = "imagenet"
        base, mobilenet_width = _detect_mobilenet(shapes)
        if mobilenet_width != 32:
            options["width"] = mobilenet_width
        if arch is None:
            arch = _attention_prefix(attention) + base
    else:
        if width != 64:
            options["width"] = width
        if arch is None:
            base, family_options = registry.architecture_of(_detect_resnet(shapes, width))
            arch = _attention_prefix(attention) + base
            options.update(family_options)
    arch_attention, _ = registry.parse_name(arch)

    if arch_attention is not None and arch_attention == attention:
        allowed = layer_options(ATTENTION_LAYERS[attention])
        kernel = shapes.get(REDUCTION_KERNELS[attention])
        if kernel is not None and kernel[1] and kernel[0] // kernel[1] != 16:
            options["reduction"] = kernel[0] // kernel[1]
        spatial = shapes.get(SPATIAL_KERNEL)
        if attention == "cbam" and spatial is not None and spatial[0] != 7:
            options["kernel_size"] = spatial[0]
        if variant == source.variant:
            options.update({k: v for k, v in source.attention_overrides.items() if k in allowed})
    head = shapes.get("params/fc/kernel")
    num_classes = head[1] if head is not None else 0
    return Detected(layout=layout, arch=arch, variant=variant, stem=stem, num_classes=num_classes, options=options)


def detect(state: Mapping[str, np.ndarray], *, arch: str | None = None, variant: str | None = None,
           layout: str | None = None) -> Detected:
    """Detect the model of a flat state_dict (see `reading.read_state_dict`); explicit arguments win."""
    source = get_layout(layout) if layout else detect_layout(list(state))
    if f"{source.torch_module('conv1')[0]}.weight" not in state:
        _raise_if_prefixed(list(state))
    return infer_model(flax_shapes(state, source), layout=source.name, variant=variant, arch=arch)


# CBAM options of the paper's Sec. 4.1 ablation that every PyTorch layout has at these values.
PYTORCH_CBAM_DESIGN = {"arrangement": "channel_first", "spatial_descriptor": "pool"}


def variant_of(model: ResNet) -> str:
    """The registry variant whose attention presets `model` uses ('official' for plain and BAM models);
    ConversionError for a CBAM that no PyTorch code has (another arrangement or spatial descriptor)."""
    if model.attention not in ("cbam",):
        return "official"
    # The PyTorch codes have only the paper's CBAM: channel first, channel pooling. The other
    # arrangements have the same parameters, so without this check they would export "fine".
    design = {k: model.attention_options.get(k, v) for k, v in PYTORCH_CBAM_DESIGN.items()}
    if design != PYTORCH_CBAM_DESIGN:
        raise ConversionError(f"The model's CBAM design {design} has no PyTorch layout (the PyTorch codes have "
                              f"{PYTORCH_CBAM_DESIGN} only).")
    for name, preset in registry.VARIANTS.items():
        if all(model.attention_options.get(k) == v for k, v in preset["cbam"].items()
               if k in ("mlp_bias", "pool_order", "spatial_use_bn")):
            return name
    raise ConversionError(f"The model's CBAM options {dict(model.attention_options)} match no PyTorch variant "
                          f"({', '.join(registry.VARIANTS)}); it has no PyTorch layout to export to.")


def _detect_attention(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if any("/attention/channel/" in path for path in shapes):
        return "cbam"
    if any("/attention/" in path for path in shapes):
        return "se"
    if any(path.startswith("params/bam") for path in shapes):
        return "bam"
    return None


def _detect_resnet(shapes: Mapping[str, tuple[int, ...]], width: int) -> ResNet:
    """A plain ResNet with the checkpoint's stages, cardinality, bottleneck width and stage widths."""
    block, stage_sizes = registry.DEPTHS[_detect_depth(shapes)]
    widths = []
    for stage in range(1, len(stage_sizes) + 1):
        last_conv = shapes.get(f"params/layer{stage}_0/conv{3 if block == 'bottleneck' else 2}/kernel")
        if last_conv is None:
            raise ConversionError(f"No last convolution in the first block of stage {stage}; not a ResNet checkpoint.")
        widths.append(last_conv[3] // (4 if block == "bottleneck" else 1))
    groups, base_width = 1, 64
    grouped = shapes.get("params/layer1_0/conv2/kernel")
    if block == "bottleneck" and grouped is not None and len(grouped) == 4 and grouped[2]:
        inner = grouped[3]
        groups = inner // grouped[2]
        per_group = inner // groups
        base_width = -(-per_group * 64 // widths[0])  # the smallest one giving int(width * b / 64) == per_group
    stage_widths = None if widths == [width * 2**s for s in range(len(widths))] else tuple(widths)
    return ResNet(stage_sizes=stage_sizes, block=block, width=width, groups=groups, base_width=base_width,
                  stage_widths=stage_widths)


def _detect_mobilenet(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, int]:
    """The registered MobileNet and `width` whose channels the checkpoint's stem and pointwise convs have."""
    found = [shapes["params/conv1/kernel"][3]] + [
        shapes[path][3] for path in sorted((p for p in shapes if re.fullmatch(r"params/stage\d+_\d+/pw_conv/kernel", p)),
                                           key=lambda p: tuple(map(int, re.findall(r"\d+", p))))]
    for width in [32] + list(range(1, 8 * found[0] + 32)):  # the standard width first
        for arch, spec in registry.ARCHITECTURES.items():
            if spec["family"] == "mobilenet" and [c for stage in mobilenet_channels(spec["width_multiplier"], width)
                                                  for c in stage] == found:
                return arch, width
    raise ConversionError(f"The MobileNet's channels {found} are those of no registered MobileNet "
                          f"({', '.join(a for a, s in registry.ARCHITECTURES.items() if s['family'] == 'mobilenet')}).")


def _detect_depth(shapes: Mapping[str, tuple[int, ...]]) -> int:
    blocks: dict[int, set[int]] = {}
    bottleneck = False
    for path in shapes:
        match = re.fullmatch(r"params/layer(\d+)_(\d+)/conv(\d)/kernel", path)
        if match:
            blocks.setdefault(int(match[1]), set()).add(int(match[2]))
            bottleneck |= match[3] == "3"
    stage_sizes = tuple(len(blocks.get(stage, ())) for stage in range(1, max(blocks, default=0) + 1))
    block = "bottleneck" if bottleneck else "basic"
    for depth, expected in registry.DEPTHS.items():
        if expected == (block, stage_sizes):
            return depth
    known = ", ".join(f"{d}: {b} {s}" for d, (b, s) in registry.DEPTHS.items())
    raise ConversionError(f"The checkpoint's ResNet has {block} blocks per stage {stage_sizes}, which is no "
                          f"registered depth ({known}). Pass arch=... if it is a truncated or custom model.")


def _attention_prefix(attention: str | None) -> str:
    return next(prefix for prefix, kind in registry.PREFIXES.items() if kind == attention)


def _common_prefix(keys: list[str]) -> str:
    parts = [key.split(".") for key in keys]
    common = []
    for pieces in zip(*(p[:-1] for p in parts)):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return "".join(f"{piece}." for piece in common)


def _shape_only(shape: tuple[int, ...]) -> np.ndarray:
    """A zero-memory array of `shape`, to run layout transforms on shapes alone."""
    return np.broadcast_to(np.zeros((), np.float32), shape)
