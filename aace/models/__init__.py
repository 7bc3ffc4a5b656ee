"""Model families by name: ``wrn-D-K`` and ``pyramidnet-D-ALPHA``."""
from __future__ import annotations

import re

from torch import nn

from .pyramidnet import PyramidNet
from .wide_resnet import WideResNet

VARIANTS = ("standard", "authors")
MODEL_FORMS = "'wrn-D-K' with (D - 4) divisible by 6, D >= 10, K >= 1 (e.g. 'wrn-28-10'), " \
              "or 'pyramidnet-D-ALPHA' with (D - 2) divisible by 9 (standard) or 6 (authors) (e.g. 'pyramidnet-272-200')"


def parse_model_name(name: str, variant: str = "standard") -> tuple[str, int, float]:
    """('wrn' | 'pyramidnet', depth, width or alpha); ValueError naming the valid forms otherwise."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    match = re.fullmatch(r"(wrn|pyramidnet)-(\d+)-(\d+(?:\.\d+)?)", str(name).lower())
    if not match:
        raise ValueError(f"unknown model {name!r}: expected {MODEL_FORMS}")
    family, depth, size = match.group(1), int(match.group(2)), float(match.group(3))
    if family == "wrn":
        if depth < 10 or (depth - 4) % 6 or size < 1 or size != int(size):
            raise ValueError(f"impossible wide ResNet {name!r}: expected {MODEL_FORMS}")
        return family, depth, int(size)
    divisor = 6 if variant == "authors" else 9
    if depth < 2 + divisor or (depth - 2) % divisor or size <= 0:
        raise ValueError(f"impossible PyramidNet {name!r} for variant {variant!r}: expected {MODEL_FORMS}")
    return family, depth, size


def build_model(name: str, num_classes: int, in_channels: int = 3, variant: str = "standard") -> nn.Module:
    """Build ``wrn-D-K`` or ``pyramidnet-D-ALPHA`` for 28x28 or 32x32 inputs."""
    family, depth, size = parse_model_name(name, variant)
    if not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if family == "wrn":
        return WideResNet(depth, size, num_classes, in_channels, variant)
    return PyramidNet(depth, size, num_classes, in_channels, variant)


__all__ = ["build_model", "parse_model_name", "WideResNet", "PyramidNet", "VARIANTS"]
