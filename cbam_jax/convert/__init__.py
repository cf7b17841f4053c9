"""PyTorch checkpoints in and out: `from_torch(path_or_state_dict)` and `to_torch(variables, arch=...)`.

Sources: the official Jongchan/attention-module CBAM/BAM ResNets, timm ResNets with
`attn_layer='cbam'`, the common "blog" variant (both key styles), pytorchcv `cbam_resnet*` and plain
torchvision ResNets. Each layout is a key map declared as data in `cbam_jax.convert.layouts`.
"""

from cbam_jax.convert.detect import Detected, detect, variant_of
from cbam_jax.convert.layouts import LAYOUTS
from cbam_jax.convert.mapping import from_torch, load_variables, to_numpy_state_dict, to_torch
from cbam_jax.convert.reading import ConversionError, read_state_dict

__all__ = ["LAYOUTS", "ConversionError", "Detected", "detect", "from_torch", "load_variables", "read_state_dict",
           "to_numpy_state_dict", "to_torch", "variant_of"]
