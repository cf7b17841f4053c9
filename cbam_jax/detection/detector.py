"""The detector: a registry backbone (`features_only`) + FPN + FCOS head, and its config round trip.

    detector = create_detector("cbam_resnet50", num_classes=80)
    variables = detector.init(jax.random.key(0), jnp.zeros((1, 512, 512, 3)))
    outputs = detector.apply(variables, images)          # DenseOutputs, per point
    detections = decode.detect(outputs, *detector.points((512, 512)), (512, 512))
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from cbam_jax.detection import points as points_lib
from cbam_jax.detection.fpn import FPN
from cbam_jax.detection.head import FCOSHead
from cbam_jax.errors import InvalidInput
from cbam_jax.registry import create_model, model_config, model_from_config
from cbam_jax.resnet import ResNet

PYRAMID_STRIDES = (8, 16, 32)  # the backbone strides the FPN takes (C3, C4, C5)
DETECTOR_FIELDS = ("num_classes", "fpn_channels", "head_convs", "head_norm_groups", "train_backbone_bn",
                   "size_boundaries", "dtype")


class DenseOutputs(NamedTuple):
    """Per point, float32: class logits (B, N, K), ltrb distances in strides (B, N, 4), centerness logits (B, N)."""

    class_logits: jax.Array
    distances: jax.Array
    centerness_logits: jax.Array


class FCOS(nn.Module):
    """FCOS (Tian et al. 2019) on a `ResNet` backbone: images (B, H, W, 3) normalised -> `DenseOutputs`.

    Attributes:
      backbone: a `ResNet` with `features_only=True` whose outputs are at strides 8, 16, 32
        (`create_detector` picks them); any attention, any depth.
      num_classes: object classes.
      fpn_channels: channels of the pyramid and the head towers (256 in FCOS).
      head_convs: convs per head tower (4 in FCOS).
      head_norm_groups: GroupNorm groups in the head (must divide fpn_channels).
      train_backbone_bn: True: the backbone's BatchNorm uses batch statistics in training and updates
        them; False: frozen (running statistics, as detectors fine-tuned at batch 2 per device do).
      size_boundaries: object sizes between the levels P3..P7 (see `points.FCOS_SIZE_BOUNDARIES`).
      dtype: computation dtype of the FPN and head (outputs are float32).
    """

    backbone: ResNet
    num_classes: int
    fpn_channels: int = 256
    head_convs: int = 4
    head_norm_groups: int = 32
    train_backbone_bn: bool = True
    size_boundaries: Sequence[float] = points_lib.FCOS_SIZE_BOUNDARIES
    dtype: Any = jnp.float32

    strides: tuple[int, ...] = (*PYRAMID_STRIDES, 64, 128)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_boundaries", tuple(float(b) for b in self.size_boundaries))
        if not self.backbone.features_only:
            raise InvalidInput("FCOS: the backbone must be built with features_only=True (create_detector does this).")
        reductions = tuple(info.reduction for info in self.backbone.feature_info)
        if reductions != PYRAMID_STRIDES:
            raise InvalidInput(f"FCOS: the backbone's features must be at strides {PYRAMID_STRIDES}; got {reductions} "
                               "(use the 'imagenet' stem and out_indices (2, 3, 4)).")
        if self.num_classes < 1 or self.fpn_channels < 1 or self.head_convs < 0:
            raise InvalidInput(f"FCOS: num_classes and fpn_channels must be >= 1 and head_convs >= 0; got "
                               f"{self.num_classes}, {self.fpn_channels}, {self.head_convs}.")
        if self.fpn_channels % self.head_norm_groups:
            raise InvalidInput(f"FCOS: head_norm_groups ({self.head_norm_groups}) must divide fpn_channels "
                               f"({self.fpn_channels}).")
        if len(self.size_boundaries) != len(self.strides) - 1 or list(self.size_boundaries) != sorted(self.size_boundaries):
            raise InvalidInput(f"FCOS: size_boundaries must be {len(self.strides) - 1} increasing sizes; "
                               f"got {self.size_boundaries}.")
        super().__post_init__()

    def points(self, image_size: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(points (N, 2), strides (N,), size ranges (N, 2)) of an input of (H, W), matching the outputs."""
        shapes = points_lib.level_shapes(image_size, self.strides)
        return points_lib.points(shapes, self.strides, self.size_boundaries)

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> DenseOutputs:
        """Per-point outputs for normalised images (B, H, W, 3)."""
        features = self.backbone(images, train=train and self.train_backbone_bn)
        levels = FPN(self.fpn_channels, extra_levels=len(self.strides) - len(PYRAMID_STRIDES), dtype=self.dtype,
                     name="fpn")(features)
        expected = points_lib.level_shapes(images.shape[1:3], self.strides)
        found = tuple(tuple(level.shape[1:3]) for level in levels)
        assert found == expected, (found, expected)  # points() relies on this
        return DenseOutputs(*FCOSHead(self.num_classes, self.fpn_channels, self.head_convs, self.head_norm_groups,
                                      dtype=self.dtype, name="head")(levels))


def backbone_out_indices(backbone: ResNet) -> tuple[int, ...]:
    """The feature indices of `backbone` (features_only or not) at strides 8, 16, 32."""
    full = backbone.clone(features_only=True, out_indices=None)
    by_stride = {info.reduction: info.index for info in full.feature_info}
    missing = [s for s in PYRAMID_STRIDES if s not in by_stride]
    if missing:
        raise InvalidInput(f"The backbone has no features at stride(s) {missing} (its stages are at "
                           f"{sorted(by_stride)}); detection needs the 'imagenet' stem.")
    return tuple(by_stride[s] for s in PYRAMID_STRIDES)


def create_detector(backbone: str, num_classes: int, *, variant: str = "official", width: int = 64,
                    dtype: Any = jnp.float32, backbone_options: Mapping[str, Any] | None = None,
                    **detector_options: Any) -> FCOS:
    """An FCOS detector on the registry model `backbone` (e.g. 'cbam_resnet50', 'resnet18').

    Args:
      backbone: any name of `cbam_jax.list_models()`; always with the 'imagenet' stem.
      num_classes: object classes.
      variant, width, backbone_options: as `create_model` (e.g. {'reduction': 16}).
      dtype: computation dtype of the whole detector.
      **detector_options: FCOS fields (fpn_channels, head_convs, head_norm_groups, train_backbone_bn,
        size_boundaries).
    """
    model = create_model(backbone, num_classes=0, stem="imagenet", variant=variant, width=width, dtype=dtype,
                         **dict(backbone_options or {}))
    model = model.clone(features_only=True, out_indices=backbone_out_indices(model))
    return FCOS(backbone=model, num_classes=num_classes, dtype=dtype, **detector_options)


def detector_config(detector: FCOS) -> dict[str, Any]:
    """JSON-serialisable description of `detector` ({'backbone': model_config, FCOS fields})."""
    config = {"backbone": model_config(detector.backbone)}
    for field in DETECTOR_FIELDS:
        value = getattr(detector, field)
        config[field] = jnp.dtype(value).name if field == "dtype" else list(value) if isinstance(value, tuple) else value
    return config


def detector_from_config(config: Mapping[str, Any]) -> FCOS:
    """Inverse of `detector_config`."""
    config = dict(config)
    unknown = sorted(set(config) - {"backbone", *DETECTOR_FIELDS})
    if unknown or "backbone" not in config:
        raise InvalidInput(f"Not a detector config: unknown fields {unknown}; expected 'backbone' and {DETECTOR_FIELDS}.")
    backbone = model_from_config(dict(config.pop("backbone")))
    dtype = jnp.dtype(config.pop("dtype", "float32"))
    return FCOS(backbone=backbone, dtype=dtype, **config)


def with_bn_axis(detector: FCOS, axis_name: Any) -> FCOS:
    """The detector whose backbone BatchNorms share their batch statistics over `axis_name` (the
    pmap axis): the hook `training.parallel.DataParallel` clones models with."""
    return detector.clone(backbone=detector.backbone.clone(bn_axis_name=axis_name))
