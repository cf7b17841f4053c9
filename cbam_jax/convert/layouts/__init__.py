"""The PyTorch source layouts, one module each, in the order detection tries them."""

from cbam_jax.convert.layout import Layout
from cbam_jax.errors import InvalidInput
from cbam_jax.convert.layouts.common import COMMON, COMMON_2018
from cbam_jax.convert.layouts.official import OFFICIAL
from cbam_jax.convert.layouts.pytorchcv import PYTORCHCV, PYTORCHCV_BAM
from cbam_jax.convert.layouts.timm import TIMM
from cbam_jax.convert.layouts.torchvision import TORCHVISION

# Specific signatures first (pytorchcv's BAM-ResNets also carry the plain pytorchcv signature); the
# plain torchvision backbone (shared by all but pytorchcv) last.
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in
                              (PYTORCHCV_BAM, PYTORCHCV, OFFICIAL, TIMM, COMMON, COMMON_2018, TORCHVISION)}
# The layout `to_torch` writes for each registry variant.
LAYOUT_OF_VARIANT: dict[str, str] = {"official": "official", "timm": "timm", "common": "common"}


def get_layout(name: str) -> Layout:
    """The layout called `name`; ValueError listing the known ones otherwise."""
    if name not in LAYOUTS:
        raise InvalidInput(f"Unknown PyTorch layout {name!r}; known layouts: {', '.join(LAYOUTS)}.")
    return LAYOUTS[name]
