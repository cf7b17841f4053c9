"""The official code, Jongchan/attention-module (`ResidualNet`): CBAM and BAM ResNets.

CBAM: `layerS.B.cbam.ChannelGate.mlp.{1,3}` (Linear with bias) and
`cbam.SpatialGate.spatial.{conv,bn}` (7x7 conv over [max, mean], one-channel BatchNorm).
BAM: `bam{1,2,3}.channel_att.gate_c.*` and `bam{1,2,3}.spatial_att.gate_s.*`.
Released files wrap this in {'state_dict': ...} with DataParallel's `module.` prefix.
"""

from cbam_jax.convert.layout import CONV, LINEAR, NORM, Layout
from cbam_jax.convert.layouts.torchvision import BACKBONE

CBAM_RULES = (
    ("layer{s}_{b}/attention/channel/fc1", "layer{s}.{b}.cbam.ChannelGate.mlp.1", LINEAR),
    ("layer{s}_{b}/attention/channel/fc2", "layer{s}.{b}.cbam.ChannelGate.mlp.3", LINEAR),
    ("layer{s}_{b}/attention/spatial/conv", "layer{s}.{b}.cbam.SpatialGate.spatial.conv", CONV),
    ("layer{s}_{b}/attention/spatial/bn", "layer{s}.{b}.cbam.SpatialGate.spatial.bn", NORM),
)
BAM_RULES = (
    ("bam{i}/channel_fc1", "bam{i}.channel_att.gate_c.gate_c_fc_0", LINEAR),
    ("bam{i}/channel_bn", "bam{i}.channel_att.gate_c.gate_c_bn_1", NORM),
    ("bam{i}/channel_fc2", "bam{i}.channel_att.gate_c.gate_c_fc_final", LINEAR),
    ("bam{i}/spatial_reduce", "bam{i}.spatial_att.gate_s.gate_s_conv_reduce0", CONV),
    ("bam{i}/spatial_reduce_bn", "bam{i}.spatial_att.gate_s.gate_s_bn_reduce0", NORM),
    ("bam{i}/spatial_dilated{d}", "bam{i}.spatial_att.gate_s.gate_s_conv_di_{d}", CONV),
    ("bam{i}/spatial_dilated{d}_bn", "bam{i}.spatial_att.gate_s.gate_s_bn_di_{d}", NORM),
    ("bam{i}/spatial_final", "bam{i}.spatial_att.gate_s.gate_s_conv_final", CONV),
)

OFFICIAL = Layout(
    name="official",
    variant="official",
    description="official Jongchan/attention-module ResidualNet (CBAM or BAM)",
    signature=r"\.cbam\.(ChannelGate|SpatialGate)\.|^bam\d+\.(channel_att|spatial_att)\.",
    rules=BACKBONE + CBAM_RULES + BAM_RULES,
)
