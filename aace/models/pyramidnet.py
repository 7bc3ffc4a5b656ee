"""PyramidNet (Han et al., 2017) for 32x32 and 28x28 inputs, without ShakeDrop.

``variant="standard"`` uses bottleneck blocks ((D - 2) / 9 per stage; PyramidNet-272 alpha 200 has
about 26.2M parameters for 10 classes). ``variant="authors"`` uses basic blocks ((D - 2) / 6 per stage,
about 41.1M), as the AACE authors' code does for its "PyramidNet-272".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PyramidBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        return self.bn3(self.conv2(self.relu(self.bn2(out))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        # Parameter-free shortcut: average-pool when downsampling, zero-pad the new channels.
        shortcut = F.avg_pool2d(x, 2, ceil_mode=True) if self.stride != 1 else x
        pad = out.shape[1] - shortcut.shape[1]
        if pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, pad))
        return out + shortcut


class PyramidBottleneck(PyramidBasicBlock):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        nn.Module.__init__(self)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(out)))
        return self.bn4(self.conv3(self.relu(self.bn3(out))))


class PyramidNet(nn.Module):
    def __init__(self, depth: int, alpha: float, num_classes: int, in_channels: int = 3,
                 variant: str = "standard"):
        super().__init__()
        block = PyramidBasicBlock if variant == "authors" else PyramidBottleneck
        blocks = (depth - 2) // (6 if block is PyramidBasicBlock else 9)
        self.add_rate = alpha / (3 * blocks)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self._width, self._in_planes = 16.0, 16
        self.layer1 = self._stage(block, blocks, stride=1)
        self.layer2 = self._stage(block, blocks, stride=2)
        self.layer3 = self._stage(block, blocks, stride=2)
        self.bn_final = nn.BatchNorm2d(self._in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(self._in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and variant != "authors":  # theirs keeps torch's default bias
                nn.init.zeros_(m.bias)

    def _stage(self, block, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(blocks):
            self._width += self.add_rate  # the width grows by alpha / (3 n) at every block
            planes = int(round(self._width))
            layers.append(block(self._in_planes, planes, stride if i == 0 else 1))
            self._in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu(self.bn_final(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))
