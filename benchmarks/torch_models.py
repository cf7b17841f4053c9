"""PyTorch (NCHW) ResNets and CBAM-ResNets in the official layout, the benchmark's other side.

The layout of Jongchan/attention-module (MODELS/cbam.py, MODELS/model_resnet.py), written here
from its description: the channel gate is a shared Linear MLP with biases over the average- and
max-pooled descriptors, the spatial gate pools max then mean over channels, then a 7x7 conv
without bias and a one-channel BatchNorm; attention gates the residual branch after its last
BatchNorm. With `attention=False` the same code gives the plain torchvision-style ResNet, so both
frameworks compare the same networks (FLOPs and parameters) as `cbam_jax.create_model`.
"""

import torch
from torch import nn
from torch.nn import functional as F

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


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class Block(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3 with the stride, 1x1 x4) residual block."""

    def __init__(self, cin: int, filters: int, stride: int, bottleneck: bool, attention: bool):
        super().__init__()
        cout = filters * (4 if bottleneck else 1)
        if bottleneck:
            layers = [*_conv_bn(cin, filters, 1), nn.ReLU(inplace=True), *_conv_bn(filters, filters, 3, stride),
                      nn.ReLU(inplace=True), *_conv_bn(filters, cout, 1)]
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
                 width: int = 64):
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
                blocks.append(Block(cin, filters, 2 if stage > 0 and index == 0 else 1, bottleneck, attention))
                cin = filters * (4 if bottleneck else 1)
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))
