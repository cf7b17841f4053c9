"""pytorchcv / imgclsmob `cbam_resnet*` (pytorchcv/models/cbamresnet.py and its ResNet blocks), rewritten.

Names and arithmetic follow pytorchcv; `global_pool=True` replaces its AvgPool2d(7, stride=1) head
(global only at 224x224) by a global mean for small test inputs.
"""

import torch
from torch import nn


class ConvBlock(nn.Module):
    """pytorchcv's conv -> BatchNorm -> optional ReLU, with submodules `conv`, `bn`, `activ`."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, activation=True):
        super().__init__()
        self.activate = activation
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)
        if activation:
            self.activ = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.bn(self.conv(x))
        return self.activ(x) if self.activate else x


class ResBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = ConvBlock(in_channels, out_channels, 3, stride, 1)
        self.conv2 = ConvBlock(out_channels, out_channels, 3, 1, 1, activation=False)

    def forward(self, x):
        return self.conv2(self.conv1(x))


class ResBottleneck(nn.Module):
    def __init__(self, in_channels, out_channels, stride, bottleneck_factor=4):
        super().__init__()
        mid_channels = out_channels // bottleneck_factor
        self.conv1 = ConvBlock(in_channels, mid_channels, 1)
        self.conv2 = ConvBlock(mid_channels, mid_channels, 3, stride, 1)
        self.conv3 = ConvBlock(mid_channels, out_channels, 1, activation=False)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv1(x)))


class MLP(nn.Module):
    def __init__(self, channels, reduction_ratio=16):
        super().__init__()
        mid_channels = channels // reduction_ratio
        self.fc1 = nn.Linear(channels, mid_channels)
        self.activ = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(mid_channels, channels)

    def forward(self, x):
        return self.fc2(self.activ(self.fc1(x.view(x.size(0), -1))))


class ChannelGate(nn.Module):
    def __init__(self, channels, reduction_ratio=16):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.max_pool = nn.AdaptiveMaxPool2d(output_size=(1, 1))
        self.mlp = MLP(channels, reduction_ratio)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        att = self.sigmoid(self.mlp(self.avg_pool(x)) + self.mlp(self.max_pool(x)))
        return x * att.unsqueeze(2).unsqueeze(3).expand_as(x)


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ConvBlock(2, 1, 7, 1, 3, activation=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):  # MAX first, then MEAN, as the official code
        att = torch.cat((x.max(dim=1)[0].unsqueeze(1), x.mean(dim=1).unsqueeze(1)), dim=1)
        return x * self.sigmoid(self.conv(att))


class CbamBlock(nn.Module):
    def __init__(self, channels, reduction_ratio=16):
        super().__init__()
        self.ch_gate = ChannelGate(channels, reduction_ratio)
        self.sp_gate = SpatialGate()

    def forward(self, x):
        return self.sp_gate(self.ch_gate(x))


class CbamResUnit(nn.Module):
    def __init__(self, in_channels, out_channels, stride, bottleneck):
        super().__init__()
        self.resize_identity = (in_channels != out_channels) or (stride != 1)
        body = ResBottleneck if bottleneck else ResBlock
        self.body = body(in_channels, out_channels, stride)
        if self.resize_identity:
            self.identity_conv = ConvBlock(in_channels, out_channels, 1, stride, activation=False)
        self.cbam = CbamBlock(out_channels)
        self.activ = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = self.identity_conv(x) if self.resize_identity else x
        x = self.cbam(self.body(x))
        return self.activ(x + identity)


class ResInitBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv = ConvBlock(in_channels, out_channels, 7, 2, 3)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.pool(self.conv(x))


class CbamResNet(nn.Module):
    def __init__(self, channels, init_block_channels, bottleneck, num_classes=1000, global_pool=False):
        super().__init__()
        self.global_pool = global_pool
        self.features = nn.Sequential()
        self.features.add_module("init_block", ResInitBlock(3, init_block_channels))
        in_channels = init_block_channels
        for i, channels_per_stage in enumerate(channels):
            stage = nn.Sequential()
            for j, out_channels in enumerate(channels_per_stage):
                stride = 2 if (j == 0) and (i != 0) else 1
                stage.add_module(f"unit{j + 1}", CbamResUnit(in_channels, out_channels, stride, bottleneck))
                in_channels = out_channels
            self.features.add_module(f"stage{i + 1}", stage)
        self.features.add_module("final_pool", nn.Identity() if global_pool else nn.AvgPool2d(kernel_size=7, stride=1))
        self.output = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight)

    def forward(self, x):
        x = self.features(x)
        if self.global_pool:
            x = x.mean((2, 3))
        return self.output(x.view(x.size(0), -1))


def cbam_resnet(depth, num_classes=1000, global_pool=False):
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]
    bottleneck = depth >= 50
    widths = [256, 512, 1024, 2048] if bottleneck else [64, 128, 256, 512]
    return CbamResNet([[c] * n for c, n in zip(widths, layers)], 64, bottleneck, num_classes, global_pool)
