"""Losses for the two SAM passes: AACE for the perturbation, cross-entropy for the update.

All losses share one signature, ``loss(logits, target, reduction="mean", **options)``, and are
computed in at least float32 (bfloat16/float16 logits are upcast, so the losses stay finite under autocast;
float64 logits stay float64).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _upcast(z: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision logits; float32 and float64 as they are."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()

AACE_MODES = ("ada", "rand", "const")
AACE_TARGETS = ("authors", "normalized")
REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, reduction: str, check_labels: bool = True) -> None:
    for name, value in (("logits", logits), ("target", target)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__} (convert it with "
                             f"torch.as_tensor)")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, classes), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"logits need at least 2 classes, got {logits.shape[1]}")
    if target.dim() != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"target must have shape ({logits.shape[0]},) to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
    # An out-of-range label otherwise ends in an opaque device-side assert. The check reads one value back
    # from the device (a synchronisation): callers whose labels are known good pass check_labels=False.
    if check_labels and target.numel() and bool(((target < 0) | (target >= logits.shape[1])).any()):
        bad = target[(target < 0) | (target >= logits.shape[1])][0].item()
        raise ValueError(f"target holds label {bad}, outside [0, {logits.shape[1] - 1}]")


def _check_threshold(threshold) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def aace_target(logits: torch.Tensor, target: torch.Tensor, mode: str = "ada", threshold: float = 0.0,
                target_norm: str = "authors", generator: torch.Generator | None = None) -> torch.Tensor:
    """The AACE target distribution t (detached), shape (batch, classes), in float32.

    t_y = min(p_y, threshold); the other classes get a_j / sum_{k != y} a_k with a_j = p_j ('ada'),
    a_j ~ U(0, 1] drawn anew on every call ('rand') or a_j = 1 ('const').
    ``target_norm="authors"`` keeps the authors' code: the non-target part sums to 1, so t sums to
    1 + t_y when threshold > 0. ``"normalized"`` scales it to 1 - t_y so that t is a distribution.
    """
    if mode not in AACE_MODES:
        raise ValueError(f"mode must be one of {AACE_MODES}, got {mode!r}")
    if target_norm not in AACE_TARGETS:
        raise ValueError(f"target_norm must be one of {AACE_TARGETS}, got {target_norm!r}")
    _check_threshold(threshold)
    _check_inputs(logits, target, "none")
    z = _upcast(logits.detach())
    true = F.one_hot(target.long(), z.shape[1]).bool()
    if mode == "ada":
        # Softmax over the other classes: the renormalised p_j, without dividing by 1 - p_y (which underflows).
        others = torch.softmax(z.masked_fill(true, float("-inf")), dim=1)
    else:
        if mode == "rand":
            # U(0, 1]; a generator, when given, must live on the logits' device. Drawn in the default dtype and
            # then cast, as the authors' code draws it, so that float64 logits see the same weights.
            weights = (1.0 - torch.rand(z.shape, generator=generator, device=z.device)).to(z.dtype)
        else:
            weights = torch.ones_like(z)
        weights = weights.masked_fill(true, 0.0)
        others = weights / weights.sum(dim=1, keepdim=True)
    if threshold > 0:
        p_true = torch.softmax(z, dim=1).gather(1, target.long()[:, None]).clamp(max=threshold)
        if target_norm == "normalized":
            others = others * (1.0 - p_true)
        return others.masked_scatter(true, p_true)
    return others


def aace_loss(logits: torch.Tensor, target: torch.Tensor, mode: str = "ada", threshold: float = 0.0,
              reduction: str = "mean", target_norm: str = "authors",
              generator: torch.Generator | None = None, check_labels: bool = True) -> torch.Tensor:
    """Adaptive adversarial cross-entropy: sum_j t_j (log t_j - log p_j), t from :func:`aace_target`.

    Its gradient w.r.t. the logits is (sum_j t_j) p - t, i.e. p - t whenever t sums to 1. With
    mode 'ada' and threshold 0 it equals -log(1 - p_y) = logsumexp(z) - logsumexp(z without y), computed
    then as softplus(z_y - logsumexp(z without y)), which stays finite for any logit margin.
    """
    _check_inputs(logits, target, reduction, check_labels)
    _check_threshold(threshold)
    z = _upcast(logits)
    if mode == "ada" and threshold == 0.0:
        if target_norm not in AACE_TARGETS:
            raise ValueError(f"target_norm must be one of {AACE_TARGETS}, got {target_norm!r}")
        # -log(1 - p_y) = softplus(z_y - logsumexp(z without y)): finite for any margin, one logsumexp.
        y = target.long()[:, None]
        others = torch.logsumexp(z.scatter(1, y, float("-inf")), dim=1)
        per_sample = torch.nn.functional.softplus(z.gather(1, y).squeeze(1) - others)
        return _reduce(per_sample, reduction)
    t = aace_target(z, target, mode, threshold, target_norm, generator)
    per_sample = (torch.xlogy(t, t) - t * torch.log_softmax(z, dim=1)).sum(dim=1)
    return _reduce(per_sample, reduction)


SMOOTHING_FORMS = ("torch", "authors")


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                  reduction: str = "mean", check_labels: bool = True, smoothing_form: str = "torch") -> torch.Tensor:
    """Cross-entropy with optional label smoothing, computed in float32.

    ``smoothing_form="torch"``: torch's, eps / K on every class (the true class 1 - eps + eps / K).
    ``smoothing_form="authors"``: the AACE authors' (davda54's ``smooth_crossentropy``), 1 - eps on the true
    class and eps / (K - 1) on each other class. The two agree at eps = 0.
    """
    _check_inputs(logits, target, reduction, check_labels)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    if smoothing_form not in SMOOTHING_FORMS:
        raise ValueError(f"smoothing_form must be one of {SMOOTHING_FORMS}, got {smoothing_form!r}")
    z = _upcast(logits)
    if smoothing_form == "torch" or label_smoothing == 0.0:
        return F.cross_entropy(z, target.long(), label_smoothing=label_smoothing, reduction=reduction)
    log_p = torch.log_softmax(z, dim=1)
    t = torch.full_like(log_p, label_smoothing / (z.shape[1] - 1))
    t.scatter_(1, target.long()[:, None], 1.0 - label_smoothing)
    return _reduce(-(t * log_p).sum(dim=1), reduction)


class AACELoss(nn.Module):
    """``nn.Module`` wrapper around :func:`aace_loss`."""

    def __init__(self, mode: str = "ada", threshold: float = 0.0, reduction: str = "mean",
                 target_norm: str = "authors"):
        super().__init__()
        if mode not in AACE_MODES:
            raise ValueError(f"mode must be one of {AACE_MODES}, got {mode!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.mode, self.threshold, self.reduction, self.target_norm = mode, threshold, reduction, target_norm

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return aace_loss(logits, target, self.mode, self.threshold, self.reduction, self.target_norm)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, threshold={self.threshold}, target_norm={self.target_norm!r}"


def _true_class_log_prob(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log p_y) in at least float32."""
    log_p = torch.log_softmax(_upcast(logits), dim=1)
    return log_p, log_p.gather(1, target.long()[:, None]).squeeze(1)


def _modulated(weight: torch.Tensor, gamma: float) -> torch.Tensor:
    # weight ** gamma with weight kept off 0: for 0 < gamma < 1 the power's derivative at 0 is infinite and,
    # times the zero loss of a confident sample, would give NaN gradients.
    return weight.clamp(min=torch.finfo(weight.dtype).tiny) ** gamma


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, reduction: str = "mean",
               check_labels: bool = True) -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017), multi-class: -(1 - p_y)^gamma log p_y; gamma = 0 is cross-entropy."""
    _check_inputs(logits, target, reduction, check_labels)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    _, log_p_y = _true_class_log_prob(logits, target)
    return _reduce(-_modulated(-torch.expm1(log_p_y), gamma) * log_p_y, reduction)  # 1 - p_y = -expm1(log p_y)


def dual_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, reduction: str = "mean",
                    check_labels: bool = True) -> torch.Tensor:
    """Dual focal loss (Tao, Dong & Xu, ICML 2023, arXiv 2305.13665): -(1 - p_y + p_j)^gamma log p_y, with
    p_j the largest probability below p_y (0 when p_y is the smallest). Unlike focal loss it looks at a
    non-target class too: the weight stays large while the runner-up is close to the true class."""
    _check_inputs(logits, target, reduction, check_labels)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    log_p, log_p_y = _true_class_log_prob(logits, target)
    p = log_p.exp()
    # The target itself and any class at or above it drop out (exp of the same value compares equal).
    p_below = p.masked_fill(p >= log_p_y.exp()[:, None], 0.0)
    weight = -torch.expm1(log_p_y) + p_below.amax(dim=1)
    return _reduce(-_modulated(weight, gamma) * log_p_y, reduction)


def taylor_cross_entropy(logits: torch.Tensor, target: torch.Tensor, order: int = 2, reduction: str = "mean",
                         check_labels: bool = True) -> torch.Tensor:
    """Taylor cross-entropy (Feng et al., IJCAI 2020): sum_{k=1..order} (1 - p_y)^k / k, the order-t Taylor
    series of -log p_y around p_y = 1; bounded, hence robust to label noise. order -> infinity gives CE."""
    _check_inputs(logits, target, reduction, check_labels)
    if not (isinstance(order, int) and order >= 1):
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    _, log_p_y = _true_class_log_prob(logits, target)
    q = -torch.expm1(log_p_y)
    return _reduce(sum(q ** k / k for k in range(1, order + 1)), reduction)


def class_weights(class_counts, beta: float = 0.999) -> torch.Tensor:
    """Per-class weights (1 - beta) / (1 - beta ** n_c), scaled to average 1 over the classes: the weight of a
    class falls exponentially towards 1 - beta as its sample count n_c grows (the "effective number of samples"
    of Cui et al., CVPR 2019). Equal counts give every class weight 1."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.dim() != 1 or len(counts) < 2 or not bool((counts >= 1).all()):
        raise ValueError(f"class_counts must be one count >= 1 per class (at least 2 classes), got {class_counts!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be a number in [0, 1), got {beta!r}")
    if beta == 0:
        return torch.ones_like(counts)
    weights = (1.0 - beta) / -torch.expm1(counts * math.log(beta))  # 1 - beta ** n, accurate for beta near 1
    return weights / weights.mean()


def exponentially_weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, class_counts=None,
                                         beta: float = 0.999, reduction: str = "mean",
                                         check_labels: bool = True) -> torch.Tensor:
    """Cross-entropy with each sample weighted by its class's weight, ``class_weights(class_counts, beta)``:
    -w_y log p_y, the minority classes weighted up, exponentially in how few samples they have.

    Source: the seed system "Recognition of imbalanced underwater acoustic datasets with exponentially weighted
    cross-entropy loss" (Applied Acoustics, 2020, doi 10.1016/j.apacoust.2020.107740), whose body could not be
    read here; this is the nearest documented form of an exponentially weighted cross-entropy, the class-balanced
    weighting of Cui et al. (CVPR 2019, "Class-Balanced Loss Based on Effective Number of Samples"), whose
    weights decay exponentially (through beta ** n_c) with a class's sample count. ``reduction="mean"`` divides
    by the batch size (not by the sum of the weights), so that balanced classes give cross-entropy exactly.
    ``class_counts=None``: every class weight 1 (cross-entropy)."""
    _check_inputs(logits, target, reduction, check_labels)
    _, log_p_y = _true_class_log_prob(logits, target)
    if class_counts is None:
        return _reduce(-log_p_y, reduction)
    weights = class_weights(class_counts, beta)
    if len(weights) != logits.shape[1]:
        raise ValueError(f"class_counts must have one count per class ({logits.shape[1]}), got {len(weights)}")
    return _reduce(-weights.to(log_p_y)[target.long()] * log_p_y, reduction)


# Losses by name, for either SAM pass: loss(logits, target, reduction=..., check_labels=..., **options).
LOSSES = {"cross_entropy": cross_entropy, "aace": aace_loss, "focal": focal_loss, "dual_focal": dual_focal_loss,
          "taylor_ce": taylor_cross_entropy, "exp_weighted_ce": exponentially_weighted_cross_entropy}
