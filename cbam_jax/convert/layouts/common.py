"""The common "blog" variant (luuuyi/CBAM.PyTorch and its many copies), in both of its key styles.

Per block `ca` (channel attention: bias-free 1x1 convs) and `sa` (7x7 conv over [mean, max], no
BatchNorm). The MLP keys were renamed in 2019 (PR #7): `ca.fc.0` / `ca.fc.2` today,
`ca.fc1` / `ca.fc2` in the 2018 original; copies in the wild use either.
"""

import re

from cbam_jax.convert.layout import CONV, POINTWISE, Layout
from cbam_jax.convert.layouts.torchvision import BACKBONE


def _common_layout(name: str, key_style: str, fc1: str, fc2: str) -> Layout:
    """The common variant with the channel MLP's two 1x1 convs under `ca.{fc1}` / `ca.{fc2}`."""
    return Layout(
        name=name,
        variant="common",
        description=f"common 'blog' variant (luuuyi/CBAM.PyTorch, {key_style} keys ca.{fc1}/ca.{fc2})",
        signature=rf"\.ca\.{re.escape(fc1)}\.weight$",
        rules=BACKBONE + (
            ("layer{s}_{b}/attention/channel/fc1", f"layer{{s}}.{{b}}.ca.{fc1}", POINTWISE),
            ("layer{s}_{b}/attention/channel/fc2", f"layer{{s}}.{{b}}.ca.{fc2}", POINTWISE),
            ("layer{s}_{b}/attention/spatial/conv", "layer{s}.{b}.sa.conv1", CONV),
        ),
    )


COMMON = _common_layout("common", "2019+", "fc.0", "fc.2")
COMMON_2018 = _common_layout("common_2018", "2018", "fc1", "fc2")
