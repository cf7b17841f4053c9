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

# timm ResNets/ResNeXts with `attn_layer='se'` (`timm/layers/squeeze_excite.py` SEModule, as in
# timm's seresnet*/seresnext*): `layerS.B.se.fc{1,2}`, 1x1 convs with biases. timm rounds the hidden
# width round(C / 16) to a multiple of 8 where cbam-jax's SE takes C // 16: the same for every
# standard width (C a multiple of 128), so those checkpoints load; others fail with the shapes named.
TIMM_SE = Layout(
    name="timm_se",
    variant="official",
    description="timm ResNet/ResNeXt with attn_layer='se' (seresnet*, seresnext*)",
    signature=r"\.se\.fc1\.weight$",
    rules=BACKBONE + (
        ("layer{s}_{b}/attention/fc1", "layer{s}.{b}.se.fc1", POINTWISE),
        ("layer{s}_{b}/attention/fc2", "layer{s}.{b}.se.fc2", POINTWISE),
    ),
)
