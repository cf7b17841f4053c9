"""What the network attends to: CBAM/BAM/SE attention maps, Grad-CAM, and figures of both.

- `maps`: `attention_maps` and `grad_cam` return arrays (for notebooks);
- `figures`: `attention_figure` draws them over the input with Pillow (no plotting library);
- `command`: `cbam-jax attention --pretrained DIR IMAGE... --out DIR` writes one PNG per image.

    from cbam_jax.visualize import attention_maps, grad_cam
"""

from cbam_jax.visualize.figures import attention_figure, channel_chart, color_bar, colorize, overlay, stretch
from cbam_jax.visualize.maps import (GradCAM, attention_maps, block_names, grad_cam, last_block_name, module_order,
                                    stage_of, upsample)

__all__ = ["GradCAM", "attention_figure", "attention_maps", "block_names", "channel_chart", "color_bar", "colorize",
           "grad_cam", "last_block_name", "module_order", "overlay", "stage_of", "stretch", "upsample"]
