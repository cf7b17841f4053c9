"""cbam-jax: CBAM (Woo et al., ECCV 2018) and CBAM-ResNets in JAX/Flax.

Public API: `create_model`, `list_models`, the layers (`ChannelGate`, `SpatialGate`, `CBAM`,
`SE`, `BAM`) and the `ResNet` module; published weights (`zoo`, `list_pretrained`), the Hugging Face
Hub (`hub`), pretrained directories (`load_pretrained`, `save_pretrained`); `use_huge_pages`
(call it first in a CPU training program: faster steps, see `cbam_jax.host_memory`).
"""

from cbam_jax.layers import BAM, CBAM, SE, ChannelGate, SpatialGate
from cbam_jax import convert, hub, zoo
from cbam_jax.host_memory import use_huge_pages
from cbam_jax.pretrained import load_pretrained, save_pretrained
from cbam_jax.registry import create_model, list_models
from cbam_jax.zoo import list_pretrained
from cbam_jax.resnet import ResNet
from cbam_jax.mobilenet import MobileNet
from cbam_jax.summary import summary

__version__ = "0.1.0"

__all__ = ["BAM", "CBAM", "SE", "ChannelGate", "MobileNet", "ResNet", "SpatialGate", "convert", "create_model", "hub", "summary",
           "list_models", "list_pretrained", "load_pretrained", "save_pretrained", "use_huge_pages", "zoo"]
