"""pytorchcv / imgclsmob ResNets: plain `resnet*`, `seresnet*`, `cbam_resnet*` and `bam_resnet*`.

The official math (BAM and CBAM as Jongchan/attention-module, SE as Hu et al.), other names:
`features.init_block.conv.{conv,bn}` is the stem, `features.stage{S}.unit{B+1}.body.conv{k}.{conv,bn}`
the blocks (units counted from 1), `identity_conv` the shortcut, `output` the head. Attention:
`cbam.ch_gate.mlp.fc{1,2}` and `cbam.sp_gate.conv.{conv,bn}` (CBAM), `se.conv{1,2}` (SE: 1x1
convs with biases). BAM-ResNets wrap each unit as `unit{B+1}.res_unit` and put BAM module i (after
stage i) at the start of the next stage: `features.stage{i+1}.unit1.bam.{ch_att,sp_att}`.

Their released ImageNet weights (imgclsmob, trained with Gluon and converted) are not the official
releases: `cbam_resnet50` v0.0.537 reports 79.83% top-1 (the official file: 77.62%).
Caution: pytorchcv's `resnet50`/`resnet101`/`resnet152` and `seresnet50`/`101`/`152` put the stride on
the first 1x1 convolution of the bottleneck (ResNet v1); cbam-jax, like torchvision, strides the 3x3
(v1.5, pytorchcv's `*b` models: `resnet50b`, `seresnet50b`, ...). The weights have the same shapes, so
v1 files convert without complaint but compute something else: use the `b` models.
"""

from cbam_jax.convert.layout import CONV, LINEAR, NORM, POINTWISE, Layout

UNIT = "features.stage{s}.unit{b1}"


def _rules(unit: str) -> tuple:
    """Stem, blocks, per-block attention and head, for units (blocks) at `unit`."""
    return (
        ("conv1", "features.init_block.conv.conv", CONV),
        ("bn1", "features.init_block.conv.bn", NORM),
        ("layer{s}_{b}/conv{k}", unit + ".body.conv{k}.conv", CONV),
        ("layer{s}_{b}/bn{k}", unit + ".body.conv{k}.bn", NORM),
        ("layer{s}_{b}/downsample_conv", unit + ".identity_conv.conv", CONV),
        ("layer{s}_{b}/downsample_bn", unit + ".identity_conv.bn", NORM),
        ("layer{s}_{b}/attention/channel/fc1", unit + ".cbam.ch_gate.mlp.fc1", LINEAR),
        ("layer{s}_{b}/attention/channel/fc2", unit + ".cbam.ch_gate.mlp.fc2", LINEAR),
        ("layer{s}_{b}/attention/spatial/conv", unit + ".cbam.sp_gate.conv.conv", CONV),
        ("layer{s}_{b}/attention/spatial/bn", unit + ".cbam.sp_gate.conv.bn", NORM),
        ("layer{s}_{b}/attention/fc1", unit + ".se.conv1", POINTWISE),
        ("layer{s}_{b}/attention/fc2", unit + ".se.conv2", POINTWISE),
        ("fc", "output", LINEAR),
    )


# BAM i follows stage i, i.e. opens stage i + 1 (`{i1}`); pytorchcv counts the dilated convs from 1.
BAM = "features.stage{i1}.unit1.bam"
BAM_RULES = (
    ("bam{i}/channel_fc1", BAM + ".ch_att.init_fc.fc", LINEAR),
    ("bam{i}/channel_bn", BAM + ".ch_att.init_fc.bn", NORM),
    ("bam{i}/channel_fc2", BAM + ".ch_att.final_fc", LINEAR),
    ("bam{i}/spatial_reduce", BAM + ".sp_att.init_conv.conv", CONV),
    ("bam{i}/spatial_reduce_bn", BAM + ".sp_att.init_conv.bn", NORM),
    ("bam{i}/spatial_dilated{d}", BAM + ".sp_att.dil_convs.conv{d1}.conv", CONV),
    ("bam{i}/spatial_dilated{d}_bn", BAM + ".sp_att.dil_convs.conv{d1}.bn", NORM),
    ("bam{i}/spatial_final", BAM + ".sp_att.final_conv", CONV),
)

PYTORCHCV = Layout(
    name="pytorchcv",
    variant="official",
    description="pytorchcv/imgclsmob ResNet, SE-ResNet or CBAM-ResNet",
    signature=r"^features\.init_block\.",
    rules=_rules(UNIT),
    # Its spatial BatchNorm keeps PyTorch's default momentum 0.1 (official: 0.01) and scale init 1.
    attention_overrides={"spatial_bn_momentum": 0.9, "spatial_bn_zero_init": False},
)

PYTORCHCV_BAM = Layout(
    name="pytorchcv_bam",
    variant="official",
    description="pytorchcv/imgclsmob BAM-ResNet",
    signature=r"^features\.stage\d+\.unit\d+\.(res_unit|bam)\.",
    rules=_rules(UNIT + ".res_unit") + BAM_RULES,
)
