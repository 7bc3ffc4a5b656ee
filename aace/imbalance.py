"""What the long-tailed testbed (``RunConfig.imbalance_ratio`` > 1) records at the end of a run, for the book's
imbalance page: accuracy per class on the test set, and how much of the perturbation each class drives.

The perturbation's gradient at the final weights is a sum over classes, g = sum_c g_c, with g_c the gradient of
the class-c samples' share of the perturbation loss (their summed loss over the training set's size). Class c's
share of the perturbation is its projection on the whole: <g_c, g> / ||g||^2. The shares sum to 1, and they are
the same for SAM's normalised step and AACE's unnormalised one (both move along g): AACE's odds weighting
p_y / (1 - p_y) shows up as the share of the classes the model fits best.
"""
from __future__ import annotations

import torch

from .batches import BatchLoader

CHUNK = 256  # images per forward pass: the measurements use eval mode, so chunking does not change them


def class_accuracy(model: torch.nn.Module, loader: BatchLoader, num_classes: int) -> list[float]:
    """Accuracy on each class of ``loader``'s data (eval mode); NaN for a class it holds no image of."""
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    with torch.no_grad():
        for x, y in loader.epoch(0):
            hit = (model(x).argmax(1) == y).double().cpu()
            y = y.cpu()
            correct.index_add_(0, y, hit)
            count.index_add_(0, y, torch.ones_like(hit))
    return (correct / count).tolist()


def perturbation_class_shares(model: torch.nn.Module, loss_fn, loader: BatchLoader, num_classes: int) -> list[float]:
    """Each class's share <g_c, g> / ||g||^2 of the perturbation loss's gradient over the training images (eval
    mode, no augmentation); ``loss_fn(logits, labels)`` the run's perturbation loss, a mean over its batch."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    images = loader._normalize(loader.images)  # the training images as the model sees them, unaugmented
    labels, n = loader.labels, len(loader.labels)
    per_class = []
    for c in range(num_classes):
        grads = [torch.zeros_like(p) for p in params]
        index = torch.nonzero(labels == c).flatten()
        for start in range(0, len(index), CHUNK):
            chunk = index[start:start + CHUNK]
            loss = loss_fn(model(images[chunk]), labels[chunk]) * (len(chunk) / n)  # its summed loss over n
            for total, g in zip(grads, torch.autograd.grad(loss, params)):
                total += g
        per_class.append(torch.cat([g.flatten() for g in grads]).double())
    whole = torch.stack(per_class).sum(0)
    norm2 = whole.dot(whole)
    return [float(g.dot(whole) / norm2) if norm2 > 0 else float("nan") for g in per_class]
