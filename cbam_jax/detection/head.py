"""FCOS's dense head, shared by all pyramid levels: a classification tower and a regression tower of
3x3 convs + GroupNorm + ReLU; class logits on the first, ltrb distances and centerness on the
second (the centerness-on-regression variant of FCOS's later versions)."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.layers.common import Dtype

PAD_3X3 = ((1, 1), (1, 1))
MAX_LOG_DISTANCE = 10.0  # exp() of the regression output is clipped here: no overflow early in training


class FCOSHead(nn.Module):
    """Pyramid levels [(B, h_l, w_l, C)] -> (class logits (B, N, num_classes), distances (B, N, 4) in
    strides, centerness logits (B, N)), N = sum of h_l * w_l, level after level, row-major; float32.

    Attributes:
      num_classes: object classes (no background class: sigmoid outputs).
      channels: tower width; num_convs: convs per tower (4 in FCOS).
      norm_groups: GroupNorm groups (must divide `channels`; 32 in FCOS).
      prior_probability: initial foreground probability of every class (focal loss init, 0.01).
    """

    num_classes: int
    channels: int = 256
    num_convs: int = 4
    norm_groups: int = 32
    prior_probability: float = 0.01
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        init = nn.initializers.normal(0.01)
        conv = lambda features, name, bias_init=nn.initializers.zeros: nn.Conv(  # noqa: E731
            features, (3, 3), padding=PAD_3X3, kernel_init=init, bias_init=bias_init, dtype=self.dtype, name=name)
        towers = {kind: [(conv(self.channels, f"{kind}_conv{i}"),
                          nn.GroupNorm(self.norm_groups, dtype=self.dtype, name=f"{kind}_norm{i}"))
                         for i in range(self.num_convs)] for kind in ("class", "box")}
        prior_bias = -math.log((1 - self.prior_probability) / self.prior_probability)
        class_out = conv(self.num_classes, "class_logits", nn.initializers.constant(prior_bias))
        box_out = conv(4, "box_distances")
        centerness_out = conv(1, "centerness")
        # FCOS's learnable per-level scale of the regression output.
        scales = [self.param(f"scale{i}", nn.initializers.ones, ()) for i in range(len(levels))]

        def tower(kind: str, x: jax.Array) -> jax.Array:
            for layer, norm in towers[kind]:
                x = nn.relu(norm(layer(x)))
            return x

        all_classes, all_distances, all_centerness = [], [], []
        for x, scale in zip(levels, scales):
            batch = x.shape[0]
            box_features = tower("box", x)
            log_distances = jnp.clip(scale * box_out(box_features).astype(jnp.float32), -MAX_LOG_DISTANCE, MAX_LOG_DISTANCE)
            all_classes.append(class_out(tower("class", x)).astype(jnp.float32).reshape(batch, -1, self.num_classes))
            all_distances.append(jnp.exp(log_distances).reshape(batch, -1, 4))
            all_centerness.append(centerness_out(box_features).astype(jnp.float32).reshape(batch, -1))
        return (jnp.concatenate(all_classes, 1), jnp.concatenate(all_distances, 1),
                jnp.concatenate(all_centerness, 1))
