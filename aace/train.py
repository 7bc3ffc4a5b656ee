"""One run: a RunConfig in; metrics, a summary and a checkpoint out, in the run store.

Every method shares one loop. A SAM step is ``aace.sam_step``, the public step a user calls: forward and
backward with the perturbation loss (CE for SAM, AACE for SAM+AACE), ``first_step`` to w + e, forward and
backward at w + e with the update loss under ``frozen_bn_stats``, back to w and the SGD step. SGD does one
pass with the update loss.
Metrics stay on the device during an epoch and reach the host once per epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch

from . import distributed, signals, store
from .machine import environment
from .config import RunConfig
from .batches import BatchLoader, prepare_data
from .tables import STEP_COLUMNS, epoch_row
from .losses import LOSSES, aace_loss, cross_entropy
from .models import build_model
from .sam import SAM
from .step import sam_step

def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("RunConfig.device: 'cuda' asked for but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(device)


def learning_rate(config: RunConfig, step: int, total_steps: int) -> float:
    """Learning rate at a global step (stepped per batch): the authors' x0.2 at 30/60/80 %, or cosine."""
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    passed = sum(step >= int(fraction * total_steps) for fraction in (0.3, 0.6, 0.8))
    return config.lr * 0.2 ** passed


# Evaluation batch: on 2 CPU cores WRN-10-1 evaluates 1,000 images in 370 ms as one batch and in 200 ms as
# four of 250 (the activations of a 1,000-image batch outgrow the caches).
def make_optimizer(config: RunConfig, model: torch.nn.Module):
    # foreach: one vectorised update over all tensors (on the CPU too, where torch's default loops in Python)
    base = dict(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=config.nesterov,
                foreach=True)
    if config.method == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    return SAM(model.parameters(), torch.optim.SGD, rho=config.rho, normalize=config.normalize,
               ascent=config.method == "sam", adaptive=config.adaptive, track_cosine=True, **base)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: BatchLoader) -> tuple[float, float]:
    model.eval()
    loss = torch.zeros((), device=loader.labels.device)
    correct = torch.zeros((), device=loader.labels.device)
    for x, y in loader.epoch(0):
        logits = model(x)
        loss += torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    n = len(loader.labels)
    return loss.item() / n, correct.item() / n


def loss_functions(config: RunConfig, loss_generator: torch.Generator | None = None):
    """(perturbation loss, update loss) of a run, each ``fn(logits, labels)`` with the config's options.

    Labels are checked once when the data loads, so the losses skip their per-call check (a host sync).
    """
    def named(name, options):
        return lambda z, t: LOSSES[name](z, t, check_labels=False, **options)

    update_loss_fn = named(config.update_loss, config.loss_options(config.update_loss))
    if config.method == "aace":
        def perturbation_loss_fn(z, t):
            return aace_loss(z, t, config.aace_mode, config.aace_threshold, target_norm=config.aace_target,
                             generator=loss_generator, check_labels=False)
    else:
        name = config.perturbation_loss or "cross_entropy"
        # label smoothing belongs to the update step: the ascent uses plain CE, as the authors' code
        perturbation_loss_fn = named(name, {} if name == "cross_entropy" else config.loss_options(name))
    return perturbation_loss_fn, update_loss_fn


def autocast_for(config: RunConfig, device: torch.device):
    """The forward passes' autocast context: bfloat16 or float16, or none for fp32."""
    if config.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if config.precision == "bf16" else torch.float16)


def train_epoch(config, model, optimizer, loader, epoch, total_steps, loss_generator, progress=None, scaler=None,
                world: distributed.World = distributed.World()):
    """One epoch; returns the per-step statistics as one (steps, len(STEP_COLUMNS)) device tensor.

    Under torchrun, ``model`` is the DDP-wrapped model and each rank trains on its slice of every global
    batch; the statistics are this rank's.
    """
    model.train()
    steps_per_epoch = len(loader)
    device = loader.labels.device
    stats = torch.empty(steps_per_epoch, len(STEP_COLUMNS), device=device)
    nan = torch.full((), float("nan"), device=device)
    autocast = autocast_for(config, device)
    perturbation_loss_fn, update_loss_fn = loss_functions(config, loss_generator)
    for i, (x, y) in enumerate(loader.epoch(epoch)):
        x, y = distributed.shard(x, world), distributed.shard(y, world)
        lr = learning_rate(config, epoch * steps_per_epoch + i, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if config.method == "sgd":
            with autocast:
                logits = model(x)
            loss = update_loss_fn(logits, y)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if scaler:
                scaler.step(optimizer)  # skips the step itself when the gradients overflowed
                skipped = ~torch.isfinite(grad_norm)
                scaler.update()
            else:
                optimizer.step()
                skipped = False
            optimizer.zero_grad(set_to_none=True)
            e_norm, cosine, train_loss = torch.zeros_like(nan), nan, loss.detach()
        else:
            step = sam_step(model, optimizer, x, y, perturbation_loss_fn, update_loss_fn, autocast=autocast,
                            scaler=scaler, ddp_no_sync=distributed.perturbation_context(model, config.m_sharpness))
            grad_norm, e_norm, train_loss, skipped = step.grad_norm, step.perturbation_norm, step.loss, step.skipped
            logits = step.logits  # the metrics at w come from the perturbation pass's own logits
            cosine = optimizer.perturbation_cosine
        with torch.no_grad():
            ce = cross_entropy(logits, y, check_labels=False)
            aace_value = aace_loss(logits, y, check_labels=False)
            correct = (logits.argmax(1) == y).sum()
        stats[i] = torch.stack([torch.as_tensor(lr, device=device, dtype=torch.float32), ce, aace_value,
                                grad_norm.float(), e_norm.float(), cosine.float(), train_loss.float(), correct.float(),
                                torch.as_tensor(skipped, device=device, dtype=torch.float32)])
        if progress is not None:
            progress.update(1)
    return stats


def _loss_generator(config: RunConfig, epoch: int, device: torch.device) -> torch.Generator | None:
    if config.method != "aace" or config.aace_mode != "rand":
        return None
    return torch.Generator(device=device).manual_seed(config.seed * 1_000_003 + epoch + 7)


def _first_non_finite(stats: torch.Tensor) -> tuple[int, str] | None:
    """First (step, loss name) with a non-finite loss, steps skipped by fp16 loss scaling aside."""
    stats = stats.clone()
    stats[stats[:, STEP_COLUMNS.index("skipped")] > 0] = 0.0
    losses = {"perturbation loss": stats[:, STEP_COLUMNS.index("aace_loss")], "CE": stats[:, STEP_COLUMNS.index("ce_loss")],
              "update loss": stats[:, STEP_COLUMNS.index("train_loss")]}
    bad = [(int(torch.nonzero(~torch.isfinite(v))[0]), name) for name, v in losses.items() if not torch.isfinite(v).all()]
    return min(bad) if bad else None


def is_stored(config: RunConfig, runs_dir=None) -> bool:
    """Whether the store holds this config's run, finished or diverged (``run`` would read it back)."""
    path = store.run_dir(config, resolve_device(config.device), runs_dir)
    try:
        summary = store._read_json(path / "summary.json")
    except (OSError, ValueError, store.CorruptRun):
        return False
    return (path / "config.json").is_file() and summary.get("status") in ("finished", "diverged")


def run(config: RunConfig, runs_dir: str | os.PathLike | None = None, *, progress=True,
        restart: bool = False) -> store.Run:
    """Train ``config`` (or return its stored result) and return the run.

    A finished run is read back without training; an interrupted one resumes from its last epoch-end
    checkpoint and ends with the same numbers, bit for bit on the CPU, as an uninterrupted run.
    ``restart=True`` discards whatever the store holds for this config and trains from scratch.
    ``progress``: True for a progress bar on stderr, a file object to draw it there, False for none.
    """
    if not isinstance(config, RunConfig):
        hint = " (RunConfig(**d) makes one of a dict)" if isinstance(config, dict) else ""
        raise ValueError(f"run: config must be an aace.config.RunConfig, got {type(config).__name__}{hint}")
    device = resolve_device(config.device)
    run_dir = store.run_dir(config, device, runs_dir)
    if not restart:  # a finished run is read without the lock: a read-only store still serves it
        try:
            existing = store.load_run(run_dir, missing_ok=True)
        except store.CorruptRun:
            existing = None  # handled under the lock below
        if existing is not None and existing.summary.get("status") in ("finished", "diverged"):
            store.note_use("store", run_dir)
            return existing
    world = distributed.world_from_env()
    if world.active and config.batch_size % world.size:
        raise ValueError(f"RunConfig.batch_size: expected a multiple of the {world.size} processes, "
                         f"got {config.batch_size}")
    device = distributed.init(world, device)  # joins the torchrun job's process group, if any
    with store.RunLock(run_dir) if world.main else contextlib.nullcontext():  # rank 0 owns the store
        if world.main:  # under the lock: a temporary file here is a killed writer's (SIGKILL mid-write)
            store.remove_temporary_files(run_dir)
        if restart and world.main:
            store.clear(run_dir)
        distributed.barrier(world)
        try:
            existing = store.load_run(run_dir, missing_ok=True)
        except store.CorruptRun as err:  # the checkpoint is the source of truth: rebuild the rest from it
            print(f"warning: {err}\nrebuilding the run's tables from its checkpoint", file=sys.stderr)
            existing = None
        if existing is not None and existing.summary.get("status") in ("finished", "diverged"):
            store.note_use("store", run_dir)
            return existing
        frozen = os.environ.get("AACE_FROZEN_RUNS")
        if frozen and Path(frozen).resolve() == run_dir.parent.resolve():
            raise store.MissingRun(f"{config.label()} seed {config.seed} ({run_dir.name}) is not in the frozen run "
                                   f"store {frozen}: regenerate the nbval fixture with 'make nbval-fixture'")
        threads = torch.get_num_threads()
        try:
            with signals.sigterm_raises():
                return _train(config, device, run_dir, progress, world)
        except BaseException:
            if world.main and not (run_dir / "config.json").exists():  # stopped before it began (bad data)
                store.remove_empty_run_dir(run_dir)
            raise
        finally:
            torch.set_num_threads(threads)  # a run's own thread count stays with the run


def _train(config: RunConfig, device: torch.device, run_dir, progress, world: distributed.World) -> store.Run:
    if config.threads:
        torch.set_num_threads(config.threads)
    if device.type == "cuda":  # let cuDNN time its kernels for these shapes (CUDA runs agree closely, not bitwise)
        torch.backends.cudnn.benchmark = True
    main = world.main
    progress = progress if main else False
    dspec, train_loader, test_loader, val_loader, full_test_loader = prepare_data(config, device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, dspec.num_classes, dspec.channels, config.model_variant).to(device)
    model = model.to(memory_format=torch.channels_last)
    net = distributed.wrap(model, world, device)
    optimizer = make_optimizer(config, model)
    epochs_done, epoch_rows, step_stats, wall = 0, [], [], 0.0
    checkpoint = store.load_checkpoint(run_dir, device)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        epochs_done, epoch_rows = checkpoint["epoch"], checkpoint["epoch_rows"]
        step_stats, wall = [checkpoint["step_stats"]], checkpoint["wall_seconds"]
        if main:
            store.write_tables(run_dir, epoch_rows, checkpoint["step_stats"])  # a kill may have left them behind
        if "perturbation" in checkpoint and isinstance(optimizer, SAM):
            optimizer._previous_perturbation = checkpoint["perturbation"]
    if main and (checkpoint is None or not store.holds_config(run_dir, config)):
        store.write_config(run_dir, config, {**environment(device), "processes": world.size},
                           train_size=len(train_loader.labels), test_size=len(test_loader.labels),
                           val_size=0 if val_loader is None else len(val_loader.labels))
    if main:
        store.write_summary(run_dir, {"status": "running", "epochs_done": epochs_done, "epochs": config.epochs})

    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    if scaler is not None and checkpoint is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    total_steps = config.epochs * len(train_loader)
    bar = None
    if progress:
        # tqdm.auto draws a widget inside notebooks; a given file (a terminal) gets the plain bar
        if progress is True:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        bar = tqdm(total=total_steps, initial=epochs_done * len(train_loader), unit="step",
                   desc=f"{config.label()} {config.dataset} seed {config.seed}", dynamic_ncols=True,
                   file=None if progress is True else progress)
    checkpointed = epochs_done
    try:
        for epoch in range(epochs_done, config.epochs):
            start = time.perf_counter()
            stats = train_epoch(config, net, optimizer, train_loader, epoch, total_steps,
                                _loss_generator(config, epoch, device), bar, scaler, world)
            stats = stats.cpu()  # the epoch's one host synchronisation for training metrics
            bad = _first_non_finite(stats)
            if world.active:  # every rank stops together, on rank 0's verdict
                flag = torch.tensor([0 if bad is None else 1], device=device)
                torch.distributed.broadcast(flag, 0)
                if flag.item() and bad is None:
                    bad = (0, "loss on rank 0")
            # Evaluation costs a third of a small CPU run: eval_every thins it out; the last epoch always counts.
            scored = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            test_loss, test_acc = evaluate(model, test_loader) if scored else (math.nan, math.nan)
            seconds = time.perf_counter() - start
            wall += seconds
            row = epoch_row(epoch, stats, len(train_loader.labels), test_loss, test_acc, seconds)
            if val_loader is not None:  # after the epoch's timing: images/second counts training and test only
                row["val_loss"], row["val_acc"] = evaluate(model, val_loader) if scored else (math.nan, math.nan)
            epoch_rows.append(row)
            step_stats.append(stats)
            if bad is not None:
                summary = {"status": "diverged", "epoch": epoch + 1, "step": epoch * len(train_loader) + bad[0] + 1,
                           "loss": bad[1], "epochs": config.epochs, "wall_seconds": wall}
                if main:
                    store.write_epoch(run_dir, epoch_rows, torch.cat(step_stats), None)
                    store.write_summary(run_dir, summary)
                if bar is not None:
                    bar.write(f"diverged: non-finite {bad[1]} at epoch {epoch + 1}, step {summary['step']}")
                break
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "epoch_rows": epoch_rows, "step_stats": torch.cat(step_stats), "wall_seconds": wall}
            if isinstance(optimizer, SAM) and optimizer._previous_perturbation is not None:
                state["perturbation"] = optimizer._previous_perturbation  # for the next epoch's first cosine
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            if main:
                store.write_epoch(run_dir, epoch_rows, state["step_stats"], state)
                checkpointed = epoch + 1
                store.write_summary(run_dir, {"status": "running", "epochs_done": epoch + 1,
                                              "epochs": config.epochs})
            step_stats = [state["step_stats"]]
            if bar is not None:
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_acc']:.3f}",
                                test=f"{row['test_acc']:.3f}", img_s=f"{row['images_per_second']:.0f}")
        else:
            final = epoch_rows[-1]
            if config.final_full_test:  # the final score on every test image; the curves keep the subset
                loss, acc = evaluate(model, full_test_loader) if full_test_loader else (final["test_loss"],
                                                                                        final["test_acc"])
                final = {**final, "full_test_loss": loss, "full_test_acc": acc,
                         "full_test_size": len((full_test_loader or test_loader).labels)}
            if config.imbalance_ratio > 1:  # the long-tailed testbed's record per class (aace.imbalance)
                from .imbalance import class_accuracy, perturbation_class_shares
                perturbation_fn = loss_functions(config, _loss_generator(config, config.epochs, device))[0]
                final = {**final, "test_accuracy_by_class": class_accuracy(
                    model, full_test_loader or test_loader, dspec.num_classes),
                    "perturbation_share_by_class": perturbation_class_shares(
                        model, perturbation_fn, train_loader, dspec.num_classes)}
            if main:
                store.write_summary(run_dir, {
                    "status": "finished", "epochs": config.epochs, "wall_seconds": wall,
                    **{k: final[k] for k in ("train_acc", "test_acc", "test_loss", "ce_loss", "aace_loss", "train_loss",
                                             "val_acc", "val_loss", "full_test_acc", "full_test_loss",
                                             "full_test_size", "test_accuracy_by_class",
                                             "perturbation_share_by_class") if k in final},
                    "images_per_second": sum(r["images_per_second"] for r in epoch_rows) / len(epoch_rows)})
    except (KeyboardInterrupt, signals.Terminated) as err:
        name = "SIGINT" if isinstance(err, KeyboardInterrupt) else "SIGTERM"
        if main:
            store.write_status(run_dir, {"status": "interrupted", "signal": name, "epochs_done": checkpointed,
                                    "epochs": config.epochs, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        raise store.RunInterrupted(run_dir, name, checkpointed, config.epochs) from None
    except store.StoreWriteError as err:
        if main:
            store.write_status(run_dir, {"status": "failed", "error": err.strerror, "epochs_done": checkpointed,
                                    "epochs": config.epochs})
        raise
    finally:
        if bar is not None:
            bar.close()
    distributed.barrier(world)  # the other ranks read the store only once rank 0 has written it
    result = store.load_run(run_dir)
    result.trained = True
    store.note_use("trained", run_dir)
    return result
