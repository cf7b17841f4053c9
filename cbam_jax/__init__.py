"""cbam-jax: CBAM (Woo et al., ECCV 2018) and CBAM-ResNets in JAX/Flax.

Public API: `create_model` (with `pretrained=`), `list_models`, the layers (`ChannelGate`,
`SpatialGate`, `CBAM`, `SE`, `BAM`) and the `ResNet` module; weights from any source (`load`,
`init_from`), published weights (`zoo`, `list_pretrained`), the Hugging Face Hub (`hub`), pretrained
folders (`load_pretrained`, `save_pretrained`); `use_huge_pages` (call it first in a CPU training
program: faster steps, see `cbam_jax.host_memory`).

The modules form layers, each importing only from those below (tests/test_import_layers.py):
errors/atomic/checks/images -> layers -> resnet/registry -> convert -> pretrained -> hub -> zoo ->
factory (and nnx) -> the commands and training.
"""

from cbam_jax.layers import BAM, CBAM, SE, ChannelGate, SpatialGate
from cbam_jax import convert, hub, zoo
from cbam_jax.factory import create_model, init_from, load, load_pretrained
from cbam_jax.host_memory import use_huge_pages
from cbam_jax.pretrained import save_pretrained
from cbam_jax.registry import list_models
from cbam_jax.zoo import list_pretrained
from cbam_jax.resnet import ResNet
from cbam_jax.mobilenet import MobileNet
from cbam_jax.summary import summary

__version__ = "0.1.0"

__all__ = ["BAM", "CBAM", "SE", "ChannelGate", "MobileNet", "ResNet", "SpatialGate", "convert", "create_model", "hub",
           "init_from", "list_models", "list_pretrained", "load", "load_pretrained", "save_pretrained", "summary",
           "use_huge_pages", "zoo"]
