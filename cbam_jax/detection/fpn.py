"""The feature pyramid (Lin et al. 2017) over a backbone's strides 8, 16, 32, plus FCOS's P6 and P7."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.layers.common import Dtype

PAD_3X3 = ((1, 1), (1, 1))  # PyTorch-style symmetric padding, also for the stride-2 convs


def upsample_to(x: jax.Array, height: int, width: int) -> jax.Array:
    """Nearest-neighbour x2 upsampling of (B, h, w, C), cropped to (B, height, width, C) (odd sizes
    round up on the way down, so the upsampled map can be one row/column too large)."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x[:, :height, :width]


class FPN(nn.Module):
    """C3, C4, C5 (B, H/8, W/8, *), (B, H/16, ...), (B, H/32, ...) -> P3..P7, each (B, H/s, W/s, channels)
    for s = 8, 16, 32, 64, 128 (rounded up).

    Laterals are 1x1 convs, the top-down path adds nearest-upsampled coarser maps, a 3x3 conv smooths
    each sum; P6 is a 3x3/2 conv on P5 and P7 one on ReLU(P6) (FCOS takes P6 from P5, not C5).

    Attributes:
      channels: channels of every pyramid level (256 in the papers).
      extra_levels: how many stride-2 levels after P5 (2: P6, P7).
      dtype: computation dtype.
    """

    channels: int = 256
    extra_levels: int = 2
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        conv = lambda size, name, strides=1: nn.Conv(  # noqa: E731 - one conv style for the whole pyramid
            self.channels, (size, size), strides, padding=PAD_3X3 if size == 3 else "VALID",
            kernel_init=nn.initializers.variance_scaling(1.0, "fan_in", "uniform"), dtype=self.dtype, name=name)
        laterals = [conv(1, f"lateral{i}")(c.astype(self.dtype)) for i, c in enumerate(features)]
        for i in range(len(laterals) - 2, -1, -1):
            height, width = laterals[i].shape[1:3]
            laterals[i] = laterals[i] + upsample_to(laterals[i + 1], height, width)
        outputs = [conv(3, f"output{i}")(x) for i, x in enumerate(laterals)]
        x = outputs[-1]
        for i in range(self.extra_levels):
            x = conv(3, f"extra{i}", strides=2)(nn.relu(x) if i > 0 else x)
            outputs.append(x)
        return outputs
