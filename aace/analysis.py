"""Measurements on the losses and on trained runs."""
from __future__ import annotations

import functools
import os
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


# ----------------------------------------------------------------------------- trained runs

def model_of(run, device: str = "cpu") -> torch.nn.Module:
    """The final weights of a stored run, in eval mode."""
    from .data import spec
    from .models import build_model
    from .store import load_checkpoint
    dspec = spec(run.config.dataset)
    model = build_model(run.config.model, dspec.num_classes, dspec.channels, run.config.model_variant)
    model.load_state_dict(load_checkpoint(run.path, torch.device(device))["model"])
    if os.environ.get("AACE_CHECKPOINT_LOG"):  # `make nbval-fixture` keeps only the checkpoints pages read
        with open(os.environ["AACE_CHECKPOINT_LOG"], "a") as log:
            log.write(f"{run.path.name}\n")
    return model.to(device).eval()


@functools.lru_cache(maxsize=2)
def _dataset(name: str, data_root: str | None):
    from .data import load_dataset
    return load_dataset(name, data_root)  # read once per page, not once per run analysed


def fixed_batch(run, size: int = 512, seed: int = 0, split: str = "train"):
    """A fixed, stratified batch of a run's training (or test) data, normalised, without augmentation."""
    from .batches import BatchLoader
    from .data import mean_std, spec, stratified_subset, train_validation_split
    c = run.config
    train, test = _dataset(c.dataset, c.data_root)
    dspec = spec(c.dataset)
    mean, std = mean_std(dspec, train)
    if c.val_subset:  # the run's own training images, as prepare_data drew them
        train = train.subset(train_validation_split(train.labels, c.train_subset, c.val_subset, c.data_seed)[0])
    elif c.train_subset:
        train = train.subset(stratified_subset(train.labels, c.train_subset, c.data_seed))
    data = train if split == "train" else test
    data = data.subset(stratified_subset(data.labels, min(size, len(data)), seed))
    return next(BatchLoader(data, dspec, mean, std, len(data), train=False).epoch(0))


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def hessian_top_eigenvalue(loss_fn, params: list[torch.Tensor], iters: int = 20, seed: int = 0,
                           tol: float = 1e-4) -> float:
    """Largest-magnitude eigenvalue of the Hessian of ``loss_fn()`` w.r.t. ``params``, by power iteration on
    Hessian-vector products (double backward). ``seed`` fixes the start vector."""
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eigenvalue = 0.0
    for _ in range(iters):
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        hv = torch.autograd.grad(grads, params, grad_outputs=v)
        new = float(sum((a * b).sum() for a, b in zip(hv, v)))
        norm = torch.sqrt(sum((x * x).sum() for x in hv))
        if float(norm) == 0.0:
            return 0.0
        v = [x.detach() / norm for x in hv]
        if abs(new - eigenvalue) <= tol * max(1.0, abs(new)):
            return new
        eigenvalue = new
    return eigenvalue


def worst_case_loss(loss_fn, params: list[torch.Tensor], rho: float, steps: int = 5, seed: int = 0) -> float:
    """max loss within the L2 ball of radius rho around params, estimated by ``steps`` normalised ascent steps
    of length rho / steps each, projected back onto the ball (weights restored afterwards)."""
    original = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(seed)
    e = [1e-6 * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) for p in params]
    best = -float("inf")
    try:
        for _ in range(steps + 1):
            with torch.no_grad():
                for p, p0, d in zip(params, original, e):
                    p.copy_(p0 + d)
            loss = loss_fn()
            best = max(best, float(loss.detach()))
            grads = torch.autograd.grad(loss, params)
            gnorm = torch.sqrt(sum((x * x).sum() for x in grads)) + 1e-12
            e = [d + (rho / steps) * x / gnorm for d, x in zip(e, grads)]
            enorm = torch.sqrt(sum((d * d).sum() for d in e))
            if enorm > rho:
                e = [d * (rho / enorm) for d in e]
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, original):
                p.copy_(p0)
    return best


def filter_normalized_direction(params: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """A random direction scaled filter by filter to the norms of the weights (Li et al., 2018).

    For tensors of 2 or more dimensions each slice along dimension 0 (a filter, or a neuron's row) gets the
    norm of the same slice of the weights; 1-D tensors (biases, BatchNorm) get a zero direction.
    """
    g = torch.Generator().manual_seed(seed)
    directions = []
    for p in params:
        d = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
        if p.dim() <= 1:
            directions.append(torch.zeros_like(p))
            continue
        w_norm = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        d_norm = d.reshape(p.shape[0], -1).norm(dim=1)
        directions.append(d * (w_norm / (d_norm + 1e-10)).reshape(-1, *[1] * (p.dim() - 1)))
    return directions


@torch.no_grad()
def loss_landscape(loss_fn, params: list[torch.Tensor], alphas, betas=None, seed: int = 0):
    """Loss at params + a d1 (+ b d2) on a grid, d1 and d2 filter-normalised random directions.

    Returns a 1-D numpy array over ``alphas``, or a 2-D one (len(alphas), len(betas)) when ``betas`` is given.
    """
    import numpy as np
    original = [p.detach().clone() for p in params]
    d1 = filter_normalized_direction(params, seed)
    d2 = filter_normalized_direction(params, seed + 1) if betas is not None else None
    out = np.zeros((len(alphas), len(betas) if betas is not None else 1))
    try:
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas if betas is not None else [0.0]):
                for p, p0, x in zip(params, original, d1):
                    p.copy_(p0 + a * x)
                if d2 is not None:
                    for p, y in zip(params, d2):
                        p.add_(b * y)
                out[i, j] = float(loss_fn())
    finally:
        for p, p0 in zip(params, original):
            p.copy_(p0)
    return out[:, 0] if betas is None else out


def minibatch_full_cosine(model: torch.nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor,
                          batch_size: int = 128) -> list[float]:
    """Cosine between each minibatch's perturbation-loss gradient and the gradient over all the given data
    (the direction of SAM's perturbation, for normalised and unnormalised steps alike, up to its sign)."""
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = list(zip(images.split(batch_size), labels.split(batch_size)))
    grads = [_flat(torch.autograd.grad(loss_fn(model(x), y), params)) for x, y in chunks]
    weights = torch.tensor([len(y) for _, y in chunks], dtype=grads[0].dtype)
    full = sum(w * g for w, g in zip(weights, grads)) / weights.sum()
    return [float(torch.nn.functional.cosine_similarity(g, full, dim=0)) for g in grads]


def fraction_below(values, threshold: float) -> float:
    """Share of values (e.g. per-step gradient norms) below a threshold."""
    import numpy as np
    values = np.asarray(values, dtype=float)
    return float((values < threshold).mean()) if len(values) else float("nan")


def sharpness(run, batch_size: int = 512, iters: int = 20, rho: float = 0.05, seed: int = 0) -> dict:
    """Top Hessian eigenvalue and worst-case loss within an L2 ball of radius rho, of the training CE at a
    run's final weights on a fixed, stratified training batch; cached in the run folder."""
    import json
    key = f"sharpness-b{batch_size}-i{iters}-r{rho:g}-s{seed}.json"
    cache = run.path / key
    if cache.exists():
        return json.loads(cache.read_text())
    model = model_of(run)
    x, y = fixed_batch(run, batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    result = {"loss": float(loss_fn().detach()), "hessian_top": hessian_top_eigenvalue(loss_fn, params, iters, seed, 1e-3),
              "worst_case_loss": worst_case_loss(loss_fn, params, rho, steps=5, seed=seed)}
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(cache)
    return result


def landscape_of(run, alphas, batch_size: int = 512, seed: int = 0):
    """1-D filter-normalised loss landscape of the training CE around a run's final weights."""
    model = model_of(run)
    x, y = fixed_batch(run, batch_size, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss_landscape(lambda: torch.nn.functional.cross_entropy(model(x), y), params, alphas, seed=seed)


def consistency_at_end(run, batch_size: int = 128) -> float:
    """Mean cosine between the minibatch perturbation-loss gradients and the full-training-set one at a run's
    final weights (CE for SGD and SAM, AACE for SAM+AACE); training mode as in training, BN statistics
    untouched."""
    from .sam import frozen_bn_stats
    model = model_of(run)
    x, y = fixed_batch(run, run.config.train_subset or 4096, 0)
    loss_fn = aace_loss if run.config.method == "aace" else cross_entropy
    model.train()
    with frozen_bn_stats(model):
        cosines = minibatch_full_cosine(model, loss_fn, x, y, batch_size)
    return float(sum(cosines) / len(cosines))
