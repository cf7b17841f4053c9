"""pytorchcv / imgclsmob `cbam_resnet*` (and its plain `resnet*`): the official math, other names.

`features.init_block.conv.{conv,bn}` is the stem, `features.stage{S}.unit{B+1}.body.conv{k}.{conv,bn}`
the blocks (units counted from 1), `identity_conv` the shortcut, `cbam.ch_gate.mlp.fc{1,2}` and
`cbam.sp_gate.conv.{conv,bn}` the attention, `output` the head. Its `cbam_resnet50` weights are the
official release (77.62% top-1).
"""

from cbam_jax.convert.layout import CONV, LINEAR, NORM, Layout

UNIT = "features.stage{s}.unit{b1}"

PYTORCHCV = Layout(
    name="pytorchcv",
    variant="official",
    description="pytorchcv/imgclsmob ResNet or CBAM-ResNet",
    signature=r"^features\.init_block\.",
    rules=(
        ("conv1", "features.init_block.conv.conv", CONV),
        ("bn1", "features.init_block.conv.bn", NORM),
        ("layer{s}_{b}/conv{k}", UNIT + ".body.conv{k}.conv", CONV),
        ("layer{s}_{b}/bn{k}", UNIT + ".body.conv{k}.bn", NORM),
        ("layer{s}_{b}/downsample_conv", UNIT + ".identity_conv.conv", CONV),
        ("layer{s}_{b}/downsample_bn", UNIT + ".identity_conv.bn", NORM),
        ("layer{s}_{b}/attention/channel/fc1", UNIT + ".cbam.ch_gate.mlp.fc1", LINEAR),
        ("layer{s}_{b}/attention/channel/fc2", UNIT + ".cbam.ch_gate.mlp.fc2", LINEAR),
        ("layer{s}_{b}/attention/spatial/conv", UNIT + ".cbam.sp_gate.conv.conv", CONV),
        ("layer{s}_{b}/attention/spatial/bn", UNIT + ".cbam.sp_gate.conv.bn", NORM),
        ("fc", "output", LINEAR),
    ),
    # Its spatial BatchNorm keeps PyTorch's default momentum 0.1 (official: 0.01) and scale init 1.
    attention_overrides={"spatial_bn_momentum": 0.9, "spatial_bn_zero_init": False},
)
