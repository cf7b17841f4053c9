"""PyTorch (NCHW) ResNets, ResNeXts and MobileNets with CBAM in the official layout, the benchmark's other side.

The layout of Jongchan/attention-module (MODELS/cbam.py, MODELS/model_resnet.py), written here
from its description: the channel gate is a shared Linear MLP with biases over the average- and
max-pooled descriptors, the spatial gate pools max then mean over channels, then a 7x7 conv
without bias and a one-channel BatchNorm; attention gates the residual branch after its last
BatchNorm. ResNeXts are the ResNets with a grouped bottleneck 3x3 (torchvision's widths). The
MobileNet v1 is cbam-jax's (`cbam_jax/mobilenet.py`: pytorchcv's channels, CBAM after every
depthwise and pointwise conv); no published PyTorch code places CBAM in a MobileNet. With
`attention=False` the same code gives the plain networks, so both frameworks compare the same
networks (FLOPs and parameters) as `cbam_jax.create_model`; `twin(name)` builds the one of a
registered name.
"""

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from cbam_jax.registry import ARCHITECTURES, split_name

# depth -> (bottleneck?, blocks per stage)
DEPTHS = {18: (False, (2, 2, 2, 2)), 34: (False, (3, 4, 6, 3)), 50: (True, (3, 4, 6, 3)),
          101: (True, (3, 4, 23, 3)), 152: (True, (3, 8, 36, 3))}


class ChannelGate(nn.Module):
    """sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))) * x on (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
                                 nn.Linear(channels // reduction, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return x * torch.sigmoid(logits)[:, :, None, None]


class SpatialGate(nn.Module):
    """sigmoid(BN(conv7x7([max_c(x); mean_c(x)]))) * x on (B, C, H, W)."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class CBAM(nn.Sequential):
    def __init__(self, channels: int):
        super().__init__(ChannelGate(channels), SpatialGate())


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class Block(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3 with the stride and `groups`, 1x1 x4) residual block;
    the bottleneck's inner width is int(filters * base_width / 64) * groups (torchvision's)."""

    def __init__(self, cin: int, filters: int, stride: int, bottleneck: bool, attention: bool, groups: int = 1,
                 base_width: int = 64):
        super().__init__()
        cout = filters * (4 if bottleneck else 1)
        if bottleneck:
            inner = int(filters * (base_width / 64.0)) * groups
            layers = [*_conv_bn(cin, inner, 1), nn.ReLU(inplace=True), *_conv_bn(inner, inner, 3, stride, groups),
                      nn.ReLU(inplace=True), *_conv_bn(inner, cout, 1)]
        else:
            layers = [*_conv_bn(cin, filters, 3, stride), nn.ReLU(inplace=True), *_conv_bn(filters, cout, 3)]
        if attention:
            layers.append(CBAM(cout))
        self.residual = nn.Sequential(*layers)
        self.shortcut = (nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.shortcut(x) + self.residual(x))


class ResNet(nn.Module):
    """(B, 3, H, W) -> (B, num_classes) logits; `stem='cifar'` is the 3x3/1 conv without max-pool."""

    def __init__(self, depth: int, num_classes: int = 1000, stem: str = "imagenet", attention: bool = True,
                 width: int = 64, groups: int = 1, base_width: int = 64):
        super().__init__()
        bottleneck, stage_sizes = DEPTHS[depth]
        if stem == "imagenet":
            self.stem = nn.Sequential(*_conv_bn(3, width, 7, 2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, padding=1))
        else:
            self.stem = nn.Sequential(*_conv_bn(3, width, 3), nn.ReLU(inplace=True))
        blocks, cin = [], width
        for stage, num_blocks in enumerate(stage_sizes):
            for index in range(num_blocks):
                filters = width * 2**stage
                blocks.append(Block(cin, filters, 2 if stage > 0 and index == 0 else 1, bottleneck, attention,
                                    groups, base_width))
                cin = filters * (4 if bottleneck else 1)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))


# MobileNet v1: output channels of the stem and of each stage's units at width multiplier 1 (pytorchcv's).
MOBILENET_CHANNELS = ((32,), (64,), (128, 128), (256, 256), (512,) * 6, (1024, 1024))


class SeparableUnit(nn.Module):
    """3x3 depthwise conv (the stride) + BN + ReLU [+ CBAM], 1x1 conv + BN + ReLU [+ CBAM] on (B, C, H, W)."""

    def __init__(self, cin: int, cout: int, stride: int, attention: bool):
        super().__init__()
        self.dw_conv = nn.Conv2d(cin, cin, 3, stride, padding=1, groups=cin, bias=False)
        self.dw_bn = nn.BatchNorm2d(cin)
        self.dw_attention = CBAM(cin) if attention else nn.Identity()
        self.pw_conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(cout)
        self.pw_attention = CBAM(cout) if attention else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw_attention(F.relu(self.dw_bn(self.dw_conv(x))))
        return self.pw_attention(F.relu(self.pw_bn(self.pw_conv(x))))


class MobileNet(nn.Module):
    """MobileNet v1 with CBAM after every depthwise and pointwise conv: (B, 3, H, W) -> (B, num_classes).

    Channels int(c * width_multiplier); the stem is a 3x3/2 conv ('imagenet') or 3x3/1 ('cifar');
    each stage's first unit but stage 1's strides 2. Module names are cbam-jax's parameter names.
    """

    def __init__(self, width_multiplier: float = 1.0, num_classes: int = 1000, stem: str = "imagenet",
                 attention: bool = True):
        super().__init__()
        channels = [[int(c * width_multiplier) for c in stage] for stage in MOBILENET_CHANNELS]
        self.conv1 = nn.Conv2d(3, channels[0][0], 3, 2 if stem == "imagenet" else 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels[0][0])
        units, cin = OrderedDict(), channels[0][0]
        for stage, stage_channels in enumerate(channels[1:], 1):
            for index, cout in enumerate(stage_channels):
                units[f"stage{stage}_{index}"] = SeparableUnit(cin, cout, 2 if index == 0 and stage > 1 else 1,
                                                               attention)
                cin = cout
        self.units = nn.Sequential(units)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.units(F.relu(self.bn1(self.conv1(x)))).mean(dim=(2, 3)))


def twin(name: str, num_classes: int = 1000, stem: str = "imagenet") -> nn.Module:
    """The PyTorch network of a registered cbam-jax name without or with CBAM ('resnet50',
    'cbam_resnext50_32x4d', 'cbam_mobilenet_w1', ...); ValueError for other attention kinds and
    for the Wide ResNet-18s (no twin)."""
    attention, arch = split_name(name)
    spec = ARCHITECTURES[arch]
    if attention not in (None, "cbam") or "widen_factor" in spec:
        raise ValueError(f"no PyTorch twin of {name!r}: plain and CBAM ResNets, ResNeXts, Wide ResNet-50/101 "
                         f"and MobileNets only.")
    if spec["family"] == "mobilenet":
        return MobileNet(spec["width_multiplier"], num_classes, stem, attention=attention == "cbam")
    depth = next(d for d, (_, sizes) in DEPTHS.items() if sizes == spec["stage_sizes"]
                 and DEPTHS[d][0] == (spec["block"] == "bottleneck"))
    return ResNet(depth, num_classes, stem, attention=attention == "cbam", groups=spec.get("groups", 1),
                  base_width=spec.get("base_width", 64))
