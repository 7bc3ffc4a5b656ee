"""Sharpness-aware minimisation as a wrapper around any base optimizer, and BatchNorm freezing.

The perturbation e is computed from the gradients present when :meth:`SAM.first_step` runs:

    normalize=True:   e = s * rho * T^2 g / (||T g|| + eps)
    normalize=False:  e = s * rho * T^2 g

with s = +1 (ascent, SAM) or -1 (descent along g; the paper's AACE step, whose loss grows where CE
shrinks), ||.|| one L2 norm over all parameters, and T = |w| elementwise when ``adaptive`` (ASAM in
the form of davda54/sam: applied to every parameter, no eta), else 1.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn


def _check_rho(rho) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (0.0 <= rho < math.inf):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


class SAM(torch.optim.Optimizer):
    """SAM (Foret et al., 2021) and the AACE perturbation (Ratchatorn & Tanaka, 2024).

    Use it in two passes::

        perturbation_loss(model(x), y).backward()
        grad_norm, perturbation_norm = opt.first_step(zero_grad=True)   # w -> w + e
        with frozen_bn_stats(model):
            update_loss(model(x), y).backward()
        opt.second_step(zero_grad=True)                                 # back to w, base step

    ``step(closure)`` does the last three lines: call it after the first backward; the closure runs the
    second pass (forward and backward at w + e) and its loss is returned.

    ``state_dict()`` holds the base optimizer's state (momentum buffers), so a resumed run continues
    exactly. With ``track_cosine=True`` the cosine between this step's perturbation and the previous
    one is kept in ``perturbation_cosine`` (NaN on the first step), at the cost of one more copy of
    the parameters.
    """

    def __init__(self, params, base_optimizer: type[torch.optim.Optimizer], rho: float = 0.05, *,
                 normalize: bool = True, ascent: bool = True, adaptive: bool = False, eps: float = 1e-12,
                 track_cosine: bool = False, **base_kwargs):
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise ValueError(f"base_optimizer must be a torch.optim.Optimizer class, got {base_optimizer!r}")
        _check_rho(rho)
        super().__init__(params, dict(rho=rho, **base_kwargs))
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < math.inf):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
        self.normalize, self.ascent, self.adaptive, self.eps = normalize, ascent, adaptive, eps
        self.track_cosine = track_cosine
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.perturbation_cosine: torch.Tensor | None = None
        self._previous_perturbation: tuple[list[torch.Tensor], torch.Tensor] | None = None
        self._perturbed: list[torch.Tensor] | None = None  # the parameters first_step moved

    def add_param_group(self, param_group: dict) -> None:
        """As torch's, with the group's rho checked like the constructor's (every way into a group is validated)."""
        if "rho" in param_group:
            _check_rho(param_group["rho"])
        super().add_param_group(param_group)
        if hasattr(self, "base_optimizer") and self.base_optimizer.param_groups is not self.param_groups:
            self.base_optimizer.add_param_group(self.param_groups[-1])

    def _params_with_grad(self) -> list[tuple[dict, list[torch.Tensor]]]:
        return [(g, [p for p in g["params"] if p.grad is not None]) for g in self.param_groups]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Move to w + e. Returns (||T g||, ||e||) as 0-d tensors, without a host synchronisation."""
        if self._perturbed is not None:
            raise RuntimeError("first_step called twice without second_step in between")
        groups = self._params_with_grad()
        params = [p for _, ps in groups for p in ps]
        grads = [p.grad for p in params]
        scaled = torch._foreach_mul(grads, torch._foreach_abs(params)) if self.adaptive else grads
        grad_norm = _global_norm(scaled)
        sign = 1.0 if self.ascent else -1.0
        perturbations, rho_only = [], len({group["rho"] for group, ps in groups if ps}) <= 1
        for group, ps in groups:
            if not ps:
                continue
            torch._foreach_copy_([self._buffer(p, "old_p") for p in ps], ps)
            g = [p.grad for p in ps]
            scale = sign * group["rho"] / (grad_norm + self.eps) if self.normalize else sign * group["rho"]
            if self.adaptive:
                e = torch._foreach_mul(g, torch._foreach_mul(ps, ps))
                torch._foreach_mul_(e, scale)
            else:
                e = torch._foreach_mul(g, scale)
            torch._foreach_add_(ps, e)
            perturbations += e
        if not params:
            perturbation_norm = grad_norm
        elif rho_only and not self.adaptive:  # ||e|| = rho ||g|| / (||g|| + eps) or rho ||g||: no second norm
            rho = next(group["rho"] for group, ps in groups if ps)
            perturbation_norm = rho * grad_norm / (grad_norm + self.eps) if self.normalize else rho * grad_norm
        else:
            perturbation_norm = _global_norm(perturbations)
        if self.track_cosine:
            self._update_cosine(params, perturbations, perturbation_norm)
        self._perturbed = params
        if zero_grad:
            self.zero_grad(set_to_none=True)
        return grad_norm, perturbation_norm

    def _buffer(self, p: torch.Tensor, name: str) -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.empty_like(p)
        return state[name]

    def _update_cosine(self, params, perturbations, perturbation_norm) -> None:
        # cos(a, b) = 1 - ||a/|a| - b/|b|||^2 / 2: foreach ops only, accurate near 1.
        previous = self._previous_perturbation
        if previous is not None and len(previous[0]) == len(params):
            prev_e, prev_norm = previous
            diff = torch._foreach_mul(perturbations, 1.0 / perturbation_norm)
            torch._foreach_sub_(diff, torch._foreach_mul(prev_e, 1.0 / prev_norm))
            self.perturbation_cosine = 1.0 - 0.5 * _global_norm(diff) ** 2
        else:
            self.perturbation_cosine = torch.full((), float("nan"), device=perturbation_norm.device)
        self._previous_perturbation = (perturbations, perturbation_norm)

    @torch.no_grad()
    def restore(self) -> None:
        """Return to w exactly (a stored copy, not w + e - e), without a step: e.g. to skip an overflowed step."""
        if self._perturbed is None:
            raise RuntimeError("restore or second_step called without first_step")
        if self._perturbed:
            torch._foreach_copy_(self._perturbed, [self.state[p]["old_p"] for p in self._perturbed])
        self._perturbed = None

    def second_step(self, zero_grad: bool = False) -> None:
        """Return to w exactly and take the base optimizer's step (through ``self.step()``, which LR schedulers
        wrap to know that a step happened)."""
        self.step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """After ``first_step`` and the second backward: return to w and take the base step. With a closure,
        right after the first backward: ``first_step``, the closure (the second pass at w + e, which should
        run under ``frozen_bn_stats``), then the same; returns the closure's loss."""
        loss = None
        if closure is not None:
            self.first_step(zero_grad=True)
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.restore()  # back to w: a closure that raised leaves no perturbed weights behind
                raise
        elif self._perturbed is None:
            raise RuntimeError("SAM.step() (or second_step) was called without first_step(): without a closure it "
                               "finishes a step that first_step() and the second backward began; or pass a "
                               "closure that runs the second pass (aace.sam_step does the whole step)")
        with torch.no_grad():
            self.restore()
            self.base_optimizer.step()
        return loss

    def state_dict(self) -> dict:
        return {"base": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if "base" not in state_dict:
            raise ValueError("not a SAM state_dict: it has no 'base' entry (the base optimizer's state)")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Forward passes inside leave BatchNorm running mean, var and num_batches_tracked untouched.

    In training mode the layers still normalise with the batch statistics, as in the authors' code;
    they only stop tracking them (``track_running_stats=False`` makes torch skip the buffer updates).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"frozen_bn_stats: expected a torch.nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.track_running_stats for m in layers]
    try:
        for m in layers:
            m.track_running_stats = False
        yield model
    finally:
        for m, flag in zip(layers, saved):
            m.track_running_stats = flag
