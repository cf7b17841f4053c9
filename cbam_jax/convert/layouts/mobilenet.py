"""pytorchcv / imgclsmob MobileNet v1 (`mobilenet_w1`, `mobilenet_w3d4`, `mobilenet_wd2`, `mobilenet_wd4`).

`features.init_block.{conv,bn}` is the 3x3/2 stem, `features.stage{S}.unit{U+1}.{dw_conv,pw_conv}.{conv,bn}`
the depthwise-separable units, `output` the head. pytorchcv has no SE or CBAM MobileNet (nor has any
other PyTorch code with published weights), so only plain MobileNets have this layout; their weights
start an attention MobileNet through `init_from` / `cbam_jax.convert.transfer`.
"""

from cbam_jax.convert.layout import CONV, LINEAR, NORM, Layout

UNIT = "features.stage{s}.unit{b1}"

PYTORCHCV_MOBILENET = Layout(
    name="pytorchcv_mobilenet",
    variant="official",
    description="pytorchcv/imgclsmob MobileNet v1 (mobilenet_w1, _w3d4, _wd2, _wd4)",
    signature=r"^features\.stage\d+\.unit\d+\.dw_conv\.",
    rules=(
        ("conv1", "features.init_block.conv", CONV),
        ("bn1", "features.init_block.bn", NORM),
        ("stage{s}_{b}/dw_conv", UNIT + ".dw_conv.conv", CONV),
        ("stage{s}_{b}/dw_bn", UNIT + ".dw_conv.bn", NORM),
        ("stage{s}_{b}/pw_conv", UNIT + ".pw_conv.conv", CONV),
        ("stage{s}_{b}/pw_bn", UNIT + ".pw_conv.bn", NORM),
        ("fc", "output", LINEAR),
    ),
)
