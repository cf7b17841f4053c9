"""The PyTorch source layouts, one module each, in the order detection tries them."""

from cbam_jax.convert.layout import Layout
from cbam_jax.errors import InvalidInput
from cbam_jax.convert.layouts.common import COMMON, COMMON_2018
from cbam_jax.convert.layouts.mobilenet import PYTORCHCV_MOBILENET
from cbam_jax.convert.layouts.official import OFFICIAL
from cbam_jax.convert.layouts.pytorchcv import PYTORCHCV, PYTORCHCV_BAM
from cbam_jax.convert.layouts.timm import TIMM, TIMM_SE
from cbam_jax.convert.layouts.torchvision import TORCHVISION

# Specific signatures first (pytorchcv's BAM-ResNets also carry the plain pytorchcv signature); the
# plain torchvision backbone (shared by all but pytorchcv) last.
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in
                              (PYTORCHCV_BAM, PYTORCHCV_MOBILENET, PYTORCHCV, OFFICIAL, TIMM, TIMM_SE,
                               COMMON, COMMON_2018, TORCHVISION)}
# The layout `to_torch` writes for each registry variant.
LAYOUT_OF_VARIANT: dict[str, str] = {"official": "official", "timm": "timm", "common": "common"}
# Families whose weights `to_torch` writes in one layout whatever the variant (a model config's family).
LAYOUT_OF_FAMILY: dict[str, str] = {"mobilenet": "pytorchcv_mobilenet"}


def get_layout(name: str) -> Layout:
    """The layout called `name`; ValueError listing the known ones otherwise."""
    if name not in LAYOUTS:
        raise InvalidInput(f"Unknown PyTorch layout {name!r}; known layouts: {', '.join(LAYOUTS)}.")
    return LAYOUTS[name]
