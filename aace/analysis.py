"""Measurements on the losses and on trained runs."""
from __future__ import annotations

import math

import pandas as pd
import torch

from .losses import aace_loss, aace_target, cross_entropy


def logits_for_true_probability(p_true: float, num_classes: int) -> torch.Tensor:
    """Logits (1, C) in float64 with the true class (index 0) at probability p_true, the others equal."""
    margin = math.log(p_true * (num_classes - 1) / (1.0 - p_true))
    z = torch.zeros(1, num_classes, dtype=torch.float64)
    z[0, 0] = margin
    return z


def loss_vs_true_probability(p_values, num_classes: int = 10) -> pd.DataFrame:
    """CE and AACE ('ada', threshold 0) and the norms of their logit gradients, per true-class probability."""
    rows = []
    for p in p_values:
        row = {"p_true": float(p)}
        for name, fn in (("ce", cross_entropy), ("aace", aace_loss)):
            z = logits_for_true_probability(float(p), num_classes).requires_grad_()
            loss = fn(z.double(), torch.tensor([0]))
            loss.backward()
            row[f"{name}_loss"], row[f"{name}_grad_norm"] = loss.item(), z.grad.norm().item()
        rows.append(row)
    return pd.DataFrame(rows)


def example_targets(logits: torch.Tensor, label: int, threshold: float = 0.3, seed: int = 0) -> pd.DataFrame:
    """The prediction p and the AACE targets of every mode for one sample, one column each."""
    y = torch.tensor([label])
    z = logits[None].float()
    columns = {"prediction p": torch.softmax(z, 1)[0]}
    for mode in ("ada", "rand", "const"):
        columns[f"{mode}"] = aace_target(z, y, mode, generator=torch.Generator().manual_seed(seed))[0]
    columns[f"ada, th={threshold} (authors)"] = aace_target(z, y, "ada", threshold, "authors")[0]
    columns[f"ada, th={threshold} (normalized)"] = aace_target(z, y, "ada", threshold, "normalized")[0]
    return pd.DataFrame({k: v.numpy() for k, v in columns.items()})
