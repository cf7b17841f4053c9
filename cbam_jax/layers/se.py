"""Squeeze-and-Excitation (Hu et al., 2018): the channel-attention baseline of the CBAM paper.

SE is CBAM's channel gate with average pooling only: sigmoid(fc2(relu(fc1(avgpool(F))))) * F,
with biases, as in the SE-ResNets the paper compares against (ResNet-50 + SE: 28.09M params).
"""

from collections.abc import Sequence

from cbam_jax.layers.channel_gate import ChannelGate


class SE(ChannelGate):
    """Squeeze-and-Excitation on an NHWC map: (B, H, W, C) -> (B, H, W, C).

    Same attributes as `ChannelGate`, with `pool_types=('avg',)`. Sows
    `intermediates/channel_attention` of shape (B, C).
    """

    pool_types: Sequence[str] = ("avg",)
