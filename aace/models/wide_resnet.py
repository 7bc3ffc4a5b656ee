"""Wide residual networks (Zagoruyko & Komodakis, 2016), pre-activation basic blocks.

``variant="standard"`` is the published WRN-D-K: (D - 4) / 6 blocks per stage, global average pooling.
``variant="authors"`` matches the AACE authors' code: one more block per stage (their "WRN-28-10" has
5 per stage, about 46.2M parameters), a zero-initialised classifier and, on 28x28 inputs, AvgPool2d(4)
on the 7x7 final map, which pools only its top-left 4x4 corner.
"""
from __future__ import annotations

import torch
from torch import nn


class WideBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the reference implementation.
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3,
                 variant: str = "standard"):
        super().__init__()
        blocks = (depth - 4) // 6 + (1 if variant == "authors" else 0)
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.layer1 = self._stage(widths[0], widths[1], blocks, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], blocks, stride=2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.authors_pool = variant == "authors"
        self.fc = nn.Linear(widths[3], num_classes)
        # The authors' _initialize draws every convolution with Kaiming normal over fan_in; torchvision's
        # ResNets (our standard variant) over fan_out.
        fan = "fan_in" if variant == "authors" else "fan_out"
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=fan, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if variant == "authors":
            nn.init.zeros_(self.fc.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [WideBasicBlock(in_planes, planes, stride)]
        layers += [WideBasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.relu(self.bn(out))
        if self.authors_pool:
            # Their code: AvgPool2d(8) on 32x32 inputs (the whole 8x8 map), AvgPool2d(4) on 28x28.
            out = nn.functional.avg_pool2d(out, 8 if out.shape[-1] >= 8 else 4)
        else:
            out = nn.functional.adaptive_avg_pool2d(out, 1)
        return self.fc(torch.flatten(out, 1))
