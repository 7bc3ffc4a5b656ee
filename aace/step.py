"""One whole SAM (or SAM+AACE) step for your own training loop: ``aace.sam_step``.

It does what a correct SAM step needs besides the optimizer: both passes under autocast, fp16 loss scaling
with the whole step skipped when either pass overflows, BatchNorm statistics frozen in the second pass,
clipping of the update gradient, accumulation over micro-batches, and DDP's ``no_sync()`` for the
perturbation pass. The training engine (``aace.train``) takes every SAM step through it.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .sam import SAM, frozen_bn_stats

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    """What one step measured, as device tensors (no host synchronisation): the perturbation gradient's norm,
    the perturbation's length, the update loss at w + e, the perturbation pass's logits at w (for accuracy
    and the like), and whether fp16 loss scaling skipped the step."""
    grad_norm: torch.Tensor
    perturbation_norm: torch.Tensor
    loss: torch.Tensor
    logits: torch.Tensor
    skipped: bool


def _chunks(x: torch.Tensor, y: torch.Tensor, accumulate: int):
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise ValueError(f"sam_step: x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if len(y) == 0:
        raise ValueError("sam_step: the batch is empty (y has no samples); skip empty batches before the step")
    if not (isinstance(accumulate, int) and not isinstance(accumulate, bool) and 1 <= accumulate <= len(y)):
        raise ValueError(f"sam_step: accumulate must be an integer in [1, batch size {len(y)}], got {accumulate!r}")
    return list(zip(torch.chunk(x, accumulate), torch.chunk(y, accumulate)))


def _backward(model, parts, loss_fn, autocast, scaler, keep_logits: bool):
    """Forward and backward over micro-batches, each loss weighted by its share of the batch, so that the
    accumulated gradient is that of the whole batch (for mean-reduced losses). Returns (loss, logits)."""
    n = sum(len(y) for _, y in parts)
    total, logits = None, []
    for x, y in parts:
        with autocast:
            z = model(x)
        loss = loss_fn(z, y)
        if len(parts) > 1:
            loss = loss * (len(y) / n)
        (loss if scaler is None else scaler.scale(loss)).backward()
        total = loss.detach() if total is None else total + loss.detach()
        if keep_logits:
            logits.append(z.detach())
    return total, (logits[0] if len(logits) == 1 else torch.cat(logits)) if keep_logits else None


def _finite_unscaled(optimizer: SAM, scaler) -> torch.Tensor:
    """Unscale the second pass's gradients by hand (GradScaler.unscale_ runs once per update, and ran for the
    first pass) and say whether all are finite."""
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch._foreach_mul_(grads, 1.0 / scaler.get_scale())
    return torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def sam_step(model: nn.Module, optimizer: SAM, x: torch.Tensor, y: torch.Tensor, perturbation_loss: Loss,
             update_loss: Loss, *, autocast=None, scaler: torch.amp.GradScaler | None = None,
             clip_grad_norm: float | None = None, accumulate: int = 1, ddp_no_sync=None) -> StepResult:
    """One SAM step on the batch ``(x, y)``: perturbation pass at w, ``first_step`` to w + e, update pass at
    w + e with BatchNorm statistics frozen, back to w and the base optimizer's step (through
    ``optimizer.step()``, so that LR schedulers see it).

    - ``autocast``: a context for the forward passes, e.g. ``torch.autocast("cuda", dtype=torch.bfloat16)``.
    - ``scaler``: a ``torch.amp.GradScaler`` for fp16. Each pass's gradients are unscaled before use; if either
      pass overflowed, the weights go back to w, neither the weights nor the momentum move, the scale backs off
      and ``skipped`` is True (one host synchronisation per pass, in fp16 only).
    - ``clip_grad_norm``: clip the update gradient (taken at w + e) to this norm before the base step. The
      perturbation is left as the method defines it: clipping its gradient would change SAM's ascent only
      through the ``eps`` of the normalisation, and would silently shorten AACE's unnormalised step.
    - ``accumulate``: split the batch into this many micro-batches for both passes; the perturbation comes
      from pass 1's accumulated gradient, the update from pass 2's. Equal to one step on the whole batch up
      to float rounding (BatchNorm aside: it normalises each micro-batch with its own statistics).
    - ``ddp_no_sync``: under DDP, ``model.no_sync()`` to run the perturbation pass (forward and backward)
      without averaging, each process perturbing along its own gradient (m-sharpness); leave it None to
      average the perturbation gradient across processes like the update gradient.
    """
    if not isinstance(optimizer, SAM):
        raise ValueError(f"sam_step: optimizer must be an aace.SAM, got {type(optimizer).__name__}")
    if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0
                                           and math.isfinite(clip_grad_norm)):
        raise ValueError(f"sam_step: clip_grad_norm must be a finite number > 0 or None, got {clip_grad_norm!r}")
    autocast = autocast or contextlib.nullcontext()
    parts = _chunks(x, y, accumulate)
    with ddp_no_sync or contextlib.nullcontext():
        _, logits = _backward(model, parts, perturbation_loss, autocast, scaler, keep_logits=True)
    if scaler is not None:
        scaler.unscale_(optimizer)  # SAM shares its parameter groups with the base optimizer
    grad_norm, perturbation_norm = optimizer.first_step(zero_grad=True)
    if scaler is not None and not torch.isfinite(grad_norm):
        optimizer.restore()
        scaler.update()  # sees the overflow unscale_ recorded and backs off
        return StepResult(grad_norm, perturbation_norm, torch.full_like(grad_norm, float("nan")), logits, True)
    try:
        with frozen_bn_stats(model):
            loss, _ = _backward(model, parts, update_loss, autocast, scaler, keep_logits=False)
    except BaseException:
        # Back to w before the error goes on: the caller's weights are never left perturbed, and the next
        # step starts clean (not with "first_step called twice").
        optimizer.restore()
        optimizer.zero_grad(set_to_none=True)
        raise
    if scaler is not None and not _finite_unscaled(optimizer, scaler):
        optimizer.restore()
        optimizer.zero_grad(set_to_none=True)
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        return StepResult(grad_norm, perturbation_norm, loss, logits, True)
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad_norm,
                                       foreach=True)
    optimizer.step()  # finishes the step first_step began: back to w, then the base step (LR schedulers see it)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    return StepResult(grad_norm, perturbation_norm, loss, logits, False)
