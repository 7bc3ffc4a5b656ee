"""The run store: one folder per run, named by a short hash of the full config.

    runs/<method>-<hash>/config.json     the config, library versions, device, dataset sizes
                         metrics.csv     one row per epoch
                         steps.csv       one row per training step (gradient and perturbation norms...)
                         summary.json    status (running, finished, diverged) and final numbers
                         checkpoint.pt   model, optimizer and history at the last epoch end

Every file is written to a temporary name and renamed, so a kill never leaves half a file; the
checkpoint starts with the SHA-256 of the rest of it, so that damage is detected, not loaded.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig
from .signals import signals_deferred
from .tables import EPOCH_COLUMNS, STEP_COLUMNS, summary_problem


def note_use(kind: str, path: Path) -> None:
    """Where a run came from ("trained", "store", "export"), appended to $AACE_RUN_LOG when it is set: the book's
    build report counts them per page. Best effort: a log that cannot be written never stops a run."""
    log = os.environ.get("AACE_RUN_LOG")
    if log:
        try:
            with open(log, "a") as f:
                f.write(f"{kind}\t{Path(path).resolve()}\n")
        except OSError:
            pass


def default_runs_dir() -> Path:
    return Path(os.environ.get("AACE_RUNS", "runs"))


def run_dir(config: RunConfig, device: torch.device, runs_dir=None) -> Path:
    threads = config.threads or torch.get_num_threads()  # what _train will run with
    return Path(runs_dir or default_runs_dir()) / f"{config.method}-{config.run_hash(device.type, threads)}"


class RunInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM; its last epoch-end checkpoint is intact and it resumes."""

    def __init__(self, path: Path, signal_name: str, epochs_done: int, epochs: int):
        self.path, self.signal_name, self.epochs_done, self.epochs = path, signal_name, epochs_done, epochs
        self.exit_code = 130 if signal_name == "SIGINT" else 143
        super().__init__(f"run interrupted by {signal_name} after {epochs_done} of {epochs} epochs ({path}): the "
                         f"last checkpoint is kept; run the same command again to resume")


class MissingRun(LookupError):
    """A run that a frozen store (``AACE_FROZEN_RUNS``, the nbval fixture) does not hold: nothing trains there."""


class CorruptRun(RuntimeError):
    """A stored file is damaged: the message names it and the fix."""


class StoreWriteError(OSError):
    """A file of the run store could not be written (disk full, permissions): names the file and the fix."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name and rename: the old file stays whole until the new one is; on any failure
    the temporary file is removed and the previous version is left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
            raise StoreWriteError(errno.ENOSPC, f"disk full writing {path} ({len(data):,} bytes needed, {free:,} "
                                  f"free); the previous version is kept. Free some space or use another "
                                  f"--runs-dir, then run the same command again to resume") from None
        if isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError)) or (
                isinstance(err, OSError) and err.errno == errno.EROFS):
            raise StoreWriteError(err.errno, f"cannot write {path} ({err.strerror}): the run store must be "
                                  f"writable to train; choose another --runs-dir") from None
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode())


def _json(obj) -> str:
    def clean(v):  # JSON has no NaN: store it as null
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(obj), indent=2, sort_keys=True) + "\n"


def write_config(path: Path, config: RunConfig, environment: dict, **extra) -> None:
    path.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path / "config.json", _json({"config": config.to_dict(), "environment": environment,
                                                     "hash": path.name.split("-")[-1], **extra}))


def write_summary(path: Path, summary: dict) -> None:
    _atomic_write_text(path / "summary.json", _json(summary))


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def write_epoch(path: Path, epoch_rows: list[dict], step_stats: torch.Tensor, state: dict | None) -> None:
    """Checkpoint first, then the CSVs: a CSV never runs ahead of the checkpoint it came from."""
    if state is not None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
        _atomic_write_bytes(path / "checkpoint.pt", hashlib.sha256(data).hexdigest().encode() + b"\n" + data)
    write_tables(path, epoch_rows, step_stats)


def write_tables(path: Path, epoch_rows: list[dict], step_stats: torch.Tensor) -> None:
    """metrics.csv and steps.csv, from the history a checkpoint holds; a signal waits until both are written, so
    that a stopped run's two tables always agree (a SIGTERM between them left one epoch short)."""
    steps_per_epoch = len(step_stats) // len(epoch_rows)
    rows = [{"epoch": i // steps_per_epoch + 1, "step": i + 1,
             **{name: float(v) for name, v in zip(STEP_COLUMNS, values)}} for i, values in enumerate(step_stats.tolist())]
    with signals_deferred():
        _atomic_write_text(path / "metrics.csv", _csv(epoch_rows))
        _atomic_write_text(path / "steps.csv", _csv(rows))


def load_checkpoint(path: Path, device: torch.device) -> dict | None:
    file = path / "checkpoint.pt"
    if not file.exists():
        return None
    raw = file.read_bytes()
    digest, _, data = raw.partition(b"\n")
    if digest.decode(errors="replace") != hashlib.sha256(data).hexdigest():
        raise CorruptRun(f"{file} does not match the checksum it starts with (damaged or truncated). "
                         f"To start this run again from scratch: python -m aace train ... --restart, "
                         f"or delete the folder {path}")
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


def clear(path: Path) -> None:
    for name in ("checkpoint.pt", "metrics.csv", "steps.csv", "summary.json", "config.json"):
        (path / name).unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on a run folder: a second process on the same run waits for the first."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path / "lock", "w")
        except OSError as err:
            raise StoreWriteError(err.errno, f"cannot write the run store at {self.path} ({err.strerror}): "
                                  f"training needs a writable --runs-dir (finished runs can be read from a "
                                  f"read-only one)") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            print(f"run {self.path} is in use by another process; waiting for it to finish", file=sys.stderr)
            fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


@dataclass
class Run:
    """A stored run: its folder, config, per-epoch metrics, per-step statistics and summary."""
    path: Path
    config: RunConfig
    info: dict
    metrics: "object"   # pandas.DataFrame
    steps: "object"     # pandas.DataFrame
    summary: dict
    trained: bool = False  # set by aace.train.run when this call trained (part of) it, not read it back

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    @property
    def finished(self) -> bool:
        return self.status == "finished"


def remove_temporary_files(run_dir: Path) -> None:
    """The ``*.tmp`` files a writer killed mid-write left behind (call under the run's lock)."""
    for tmp in run_dir.glob("*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


def remove_empty_run_dir(run_dir: Path) -> None:
    """A run folder that holds nothing but its lock goes: a failed start leaves no trace in the store."""
    try:
        if {p.name for p in run_dir.iterdir()} <= {"lock"}:
            (run_dir / "lock").unlink(missing_ok=True)
            run_dir.rmdir()
    except OSError:
        pass


def write_status(run_dir, summary: dict) -> None:
    """Best effort: a truthful summary.json after a stop (on a full disk even this may not fit)."""
    try:
        write_summary(run_dir, summary)
    except OSError:
        pass


def holds_config(path: Path, config: RunConfig) -> bool:
    """Whether the run's config.json is readable and holds this config."""
    try:
        return json.loads((path / "config.json").read_text())["config"] == config.to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CorruptRun(f"{file} is unreadable ({err}). To redo the run: delete {file.parent} "
                         f"or train it again with --restart") from err
    if not isinstance(value, dict):
        raise CorruptRun(f"{file} holds a JSON {type(value).__name__}, not an object. To redo the run: delete "
                         f"{file.parent} or train it again with --restart")
    return value


def load_run(path: Path, missing_ok: bool = False, with_steps: bool = True) -> Run | None:
    """A stored run; ``with_steps=False`` for a folder without steps.csv (a study's export)."""
    import pandas as pd
    path = Path(path)
    if not (path / "config.json").exists():
        if missing_ok:
            return None
        raise FileNotFoundError(f"no run stored in {path}")
    info = _read_json(path / "config.json")
    summary = _read_json(path / "summary.json") if (path / "summary.json").exists() else {"status": "unknown"}
    if summary.get("status") not in STATUSES:
        raise CorruptRun(f"{path / 'summary.json'} holds status {summary.get('status')!r}, not one of {STATUSES}; "
                         f"training the config again rebuilds it from the checkpoint (or delete {path})")
    frames = []
    for name, needed in (("metrics.csv", EPOCH_COLUMNS), ("steps.csv", ("epoch", "step", "grad_norm"))):
        fix = f"training the config again rebuilds it from the checkpoint (or delete {path} to redo the run)"
        if name == "steps.csv" and not (path / name).exists() and (path / "steps.csv.gz").exists():
            name = "steps.csv.gz"  # an export's compressed copy
        try:
            frame = pd.read_csv(path / name) if (path / name).exists() else pd.DataFrame(columns=list(needed))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise CorruptRun(f"{path / name} is unreadable ({err}); {fix}") from err
        missing = [c for c in needed if c not in frame.columns]
        if missing or (len(frame) and not all(pd.api.types.is_numeric_dtype(frame[c]) for c in needed)):
            raise CorruptRun(f"{path / name} is damaged (columns {missing or 'not numeric'}); {fix}")
        frames.append(frame)
    metrics, steps = frames
    expected = summary.get("epochs") if summary.get("status") == "finished" else summary.get("epoch")
    if summary.get("status") in ("finished", "diverged") and len(metrics) != expected:
        raise CorruptRun(f"{path / 'metrics.csv'} has {len(metrics)} epochs, summary.json says {expected}; "
                         f"training the config again rebuilds it from the checkpoint (or delete {path})")
    problem = summary_problem(summary, metrics) if summary.get("status") == "finished" else None
    if problem:
        raise CorruptRun(f"{path / 'summary.json'}: {problem}; training the config again rebuilds it from the "
                         f"checkpoint (or delete {path} to redo the run)")
    covered = int(steps["epoch"].max()) if len(steps) else 0
    if with_steps and covered != len(metrics) and summary.get("status") not in ("finished", "diverged"):
        # an unfinished run killed (SIGKILL) between its two tables: read the epochs both hold; the resume rewrites
        # both from the checkpoint
        metrics, steps = metrics.iloc[:covered], steps[steps["epoch"] <= len(metrics)]
    elif with_steps and len(metrics) and covered != len(metrics):
        raise CorruptRun(f"{path / 'steps.csv'} does not cover the {len(metrics)} epochs of metrics.csv; "
                         f"training the config again rebuilds it from the checkpoint (or delete {path})")
    try:
        config = RunConfig(**info["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptRun(f"{path / 'config.json'} holds no valid RunConfig ({err}); delete {path} to redo the run") \
            from err
    return Run(path, config, info, metrics, steps, summary)


# What a summary.json may say of its run ('unknown': no summary.json yet).
STATUSES = ("running", "finished", "diverged", "interrupted", "failed", "unknown")


class StoreNotFound(FileNotFoundError):
    """The runs dir does not exist or is not a folder."""


def list_runs(runs_dir=None, problems: list | None = None) -> list[Run]:
    """Every readable run of a store; each unreadable folder adds (folder, reason) to ``problems`` (or a
    line on stderr) and never stops the listing."""
    root = Path(runs_dir or default_runs_dir())
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise StoreNotFound(f"runs dir {root} {what}: give the folder that holds the runs (--runs-dir, or the "
                            f"AACE_RUNS environment variable; the default is ./runs)")
    runs = []
    for folder in sorted(root.iterdir()):
        if (folder / "config.json").exists():
            try:
                runs.append(load_run(folder))
            except Exception as err:  # noqa: BLE001 - one damaged folder must not hide the others
                reason = err if isinstance(err, CorruptRun) else f"unreadable ({type(err).__name__}: {err})"
                if problems is None:
                    print(f"skipping {folder}: {reason}", file=sys.stderr)
                else:
                    problems.append((folder, str(reason)))
    return runs


def lock_held(path: Path) -> bool:
    """Whether a process holds the run's lock now (a live run), without taking it for long."""
    try:
        with open(path / "lock", "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


def shown_status(run_: Run) -> str:
    """The status a listing shows: 'running' only while the run's lock is held, else 'stale' (its process
    died without a word: SIGKILL, power loss)."""
    status = run_.status
    if status == "running" and not lock_held(run_.path):
        return "stale"
    return status


