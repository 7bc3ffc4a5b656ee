"""The run store's tables: the per-step and per-epoch columns of ``steps.csv`` and ``metrics.csv``, one epoch's
row from its steps, and what a finished run's ``summary.json`` must agree with."""
from __future__ import annotations

import math

import torch

STEP_COLUMNS = ("lr", "ce_loss", "aace_loss", "grad_norm", "perturbation_norm", "perturbation_cosine",
                "train_loss", "train_correct", "skipped")
EPOCH_COLUMNS = ("epoch", "lr", "ce_loss", "aace_loss", "grad_norm", "perturbation_norm", "perturbation_cosine",
                 "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second")


def epoch_row(epoch, stats, n_train, test_loss, test_acc, seconds) -> dict:
    col = {name: stats[:, i] for i, name in enumerate(STEP_COLUMNS)}
    cos = col["perturbation_cosine"]
    cos = cos[~torch.isnan(cos)]
    return {"epoch": epoch + 1, "lr": float(col["lr"][-1]),
            **{k: float(col[k].mean()) for k in ("ce_loss", "aace_loss", "grad_norm", "perturbation_norm",
                                                 "train_loss")},
            "perturbation_cosine": float(cos.mean()) if len(cos) else float("nan"),
            "train_acc": float(col["train_correct"].sum()) / n_train,
            "test_loss": test_loss, "test_acc": test_acc, "epoch_seconds": seconds,
            "images_per_second": n_train / seconds}


def summary_problem(summary: dict, metrics) -> str | None:
    """Why a finished run's summary is not what its metrics say (None when it is): every value that is also a
    column of metrics.csv must equal the last epoch's (its accuracies and losses; timings are averaged over the
    run), and every accuracy be a number in [0, 1] (a summary is what studies and pages read)."""
    last = metrics.iloc[-1] if len(metrics) else None
    for key, value in summary.items():
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key.endswith("_acc") and not (is_number and 0.0 <= value <= 1.0):
            return f"{key} {value!r} is not an accuracy in [0, 1]"
        if key == "test_accuracy_by_class" and not (isinstance(value, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and (0.0 <= v <= 1.0 or math.isnan(v))
                for v in value)):
            return f"{key} {value!r} is not a list of accuracies in [0, 1]"
        if last is not None and key in metrics.columns and key.endswith(("_acc", "_loss")):
            recorded = float(last[key])
            if not is_number or not (math.isclose(value, recorded, rel_tol=1e-12, abs_tol=0.0)
                                     or (math.isnan(value) and math.isnan(recorded))):
                return f"{key} {value!r} is not the last epoch's {recorded!r} in metrics.csv"
    return None
