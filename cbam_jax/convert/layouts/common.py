"""The common "blog" variant (luuuyi/CBAM.PyTorch and its many copies), in both of its key styles.

Per block `ca` (channel attention: bias-free 1x1 convs) and `sa` (7x7 conv over [mean, max], no
BatchNorm). The MLP keys were renamed in 2019 (PR #7): `ca.fc.0` / `ca.fc.2` today,
`ca.fc1` / `ca.fc2` in the 2018 original; copies in the wild use either.
"""

from cbam_jax.convert.layout import CONV, POINTWISE, Layout
from cbam_jax.convert.layouts.torchvision import BACKBONE

SPATIAL_RULE = ("layer{s}_{b}/attention/spatial/conv", "layer{s}.{b}.sa.conv1", CONV)

COMMON = Layout(
    name="common",
    variant="common",
    description="common 'blog' variant (luuuyi/CBAM.PyTorch, ca.fc.0/ca.fc.2 keys)",
    signature=r"\.ca\.fc\.0\.weight$",
    rules=BACKBONE + (
        ("layer{s}_{b}/attention/channel/fc1", "layer{s}.{b}.ca.fc.0", POINTWISE),
        ("layer{s}_{b}/attention/channel/fc2", "layer{s}.{b}.ca.fc.2", POINTWISE),
        SPATIAL_RULE,
    ),
)

COMMON_2018 = Layout(
    name="common_2018",
    variant="common",
    description="common 'blog' variant, 2018 key style (ca.fc1/ca.fc2 keys)",
    signature=r"\.ca\.fc1\.weight$",
    rules=BACKBONE + (
        ("layer{s}_{b}/attention/channel/fc1", "layer{s}.{b}.ca.fc1", POINTWISE),
        ("layer{s}_{b}/attention/channel/fc2", "layer{s}.{b}.ca.fc2", POINTWISE),
        SPATIAL_RULE,
    ),
)
