"""timm ResNets built with `block_args=dict(attn_layer='cbam')` (`timm/layers/cbam.py`).

The attention module sits in the block attribute `se` whatever its type:
`layerS.B.se.channel.fc{1,2}` (bias-free 1x1 convs) and `se.spatial.conv.{conv,bn}`
(7x7 conv over [mean, max], one-channel BatchNorm).
"""

from cbam_jax.convert.layout import CONV, NORM, POINTWISE, Layout
from cbam_jax.convert.layouts.torchvision import BACKBONE

TIMM = Layout(
    name="timm",
    variant="timm",
    description="timm ResNet with attn_layer='cbam'",
    signature=r"\.se\.(channel|spatial)\.",
    rules=BACKBONE + (
        ("layer{s}_{b}/attention/channel/fc1", "layer{s}.{b}.se.channel.fc1", POINTWISE),
        ("layer{s}_{b}/attention/channel/fc2", "layer{s}.{b}.se.channel.fc2", POINTWISE),
        ("layer{s}_{b}/attention/spatial/conv", "layer{s}.{b}.se.spatial.conv.conv", CONV),
        ("layer{s}_{b}/attention/spatial/bn", "layer{s}.{b}.se.spatial.conv.bn", NORM),
    ),
)
