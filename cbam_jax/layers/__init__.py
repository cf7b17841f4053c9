"""Attention layers (NHWC Flax Linen modules): CBAM and its gates, and the SE and BAM baselines."""

from cbam_jax.layers.bam import BAM
from cbam_jax.layers.cbam import CBAM
from cbam_jax.layers.channel_gate import ChannelGate
from cbam_jax.layers.se import SE
from cbam_jax.layers.spatial_gate import SpatialGate

__all__ = ["BAM", "CBAM", "SE", "ChannelGate", "SpatialGate"]
