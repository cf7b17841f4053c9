"""Plain torchvision ResNets (`torchvision.models.resnet18` ... `resnet152`), e.g. for fine-tuning.

The same backbone names are shared by the official code, timm and the common variant, which add
their attention modules on top of `BACKBONE`.
"""

from cbam_jax.convert.layout import CONV, LINEAR, NORM, Layout

BACKBONE = (
    ("conv1", "conv1", CONV),
    ("bn1", "bn1", NORM),
    ("layer{s}_{b}/conv{k}", "layer{s}.{b}.conv{k}", CONV),
    ("layer{s}_{b}/bn{k}", "layer{s}.{b}.bn{k}", NORM),
    ("layer{s}_{b}/downsample_conv", "layer{s}.{b}.downsample.0", CONV),
    ("layer{s}_{b}/downsample_bn", "layer{s}.{b}.downsample.1", NORM),
    ("fc", "fc", LINEAR),
)

TORCHVISION = Layout(
    name="torchvision",
    variant="official",
    description="plain torchvision ResNet (no attention)",
    signature=r"^layer1\.0\.conv1\.weight$",
    rules=BACKBONE,
)
