"""cbam-jax: CBAM (Woo et al., ECCV 2018) and CBAM-ResNets in JAX/Flax.

Public API: `create_model`, `list_models`, the layers (`ChannelGate`, `SpatialGate`, `CBAM`,
`SE`, `BAM`) and the `ResNet` module.
"""

from cbam_jax.layers import BAM, CBAM, SE, ChannelGate, SpatialGate
from cbam_jax.pretrained import load_pretrained, save_pretrained
from cbam_jax.registry import create_model, list_models
from cbam_jax.resnet import ResNet

__version__ = "0.1.0"

__all__ = ["BAM", "CBAM", "SE", "ChannelGate", "ResNet", "SpatialGate", "create_model", "list_models",
           "load_pretrained", "save_pretrained"]
