"""The local pool: each run as its own child process running the ``python -m aace train ...`` command that
``study --print-commands`` prints, so that a job array and a local study are one mechanism.

Why processes of our own rather than a ``ProcessPoolExecutor``: a worker that is signalled or killed is then an
exit status to report, not a broken pool or an exception the parent cannot unpickle; each child is in its own
process group (a Ctrl-C in the terminal reaches the parent only, which forwards it and waits for the children to
record their runs as ``interrupted``), and is asked by the kernel to end (SIGTERM) when the parent dies, even by
SIGKILL, so that no run outlives the study that started it.
"""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .config import PROFILES, RunConfig, profile_config

# Fields a command always names: a method's defaults would change rho and normalize otherwise.
ALWAYS_NAMED = ("method", "rho", "normalize", "seed")
# How long children get to record their runs as interrupted before they are killed.
STOP_GRACE_SECONDS = 60


class RunFailed(RuntimeError):
    """A run of the pool ended other than finished or diverged; ``exit_code`` is the study's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def closest_profile(config: RunConfig) -> str:
    """The profile from which ``config`` differs in the fewest fields (the shortest command)."""
    values = config.to_dict()
    return min(PROFILES, key=lambda p: sum(values[k] != v for k, v in profile_config(p).to_dict().items()))


def children_of(pid: int) -> list[int]:
    """The process ids whose parent is ``pid`` (from /proc; empty where there is none)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def train_argv(config: RunConfig, profile: str | None = None, runs_dir=None) -> list[str]:
    """The arguments after ``python`` that train ``config``: the profile and every field the config changes."""
    profile = profile or closest_profile(config)
    base = profile_config(profile).to_dict()
    argv = ["-m", "aace", "train", "--profile", profile]
    if runs_dir:
        argv += ["--runs-dir", str(runs_dir)]
    argv.append("--no-progress")
    for name, value in config.to_dict().items():
        if value != base[name] or name in ALWAYS_NAMED:
            argv += [f"--{name.replace('_', '-')}", "none" if value is None else str(value)]
    return argv


def train_command(config: RunConfig, profile: str | None = None, runs_dir=None) -> str:
    """``train_argv`` as one shell line, every argument quoted where the shell needs it."""
    return "python " + shlex.join(train_argv(config, profile, runs_dir))


_PR_SET_PDEATHSIG = 1


def _end_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # the parent blocked them around the fork
    # A study started as a background job ignores SIGINT, and its children would inherit that: they take the
    # interrupt the parent forwards (no terminal reaches them in their own session).
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except ValueError:  # not the main thread: the disposition is left as it was
        pass
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the parent's own handlers still stop its children
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(143)


@dataclass
class _Child:
    config: RunConfig
    process: subprocess.Popen
    stderr: object  # unnamed temporary files
    stdout: object
    started: float = 0.0  # time.time() at its start, for the ETA

    def lines(self, stream=None) -> list[str]:
        stream = stream or self.stderr
        stream.seek(0)
        return [line.strip() for line in stream.read().decode(errors="replace").splitlines() if line.strip()]

    def trained(self) -> bool:
        """Whether this child trained its run, rather than read it back (another study on the same store ran it)."""
        return any(" (trained): " in line for line in self.lines(self.stdout))

    def last_error(self) -> str:
        lines = self.lines()
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        return (errors or lines or ["no message"])[-1]


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def _stop(children, signum) -> None:
    """Send ``signum`` to every child's process group, wait for them to record their runs, kill stragglers."""
    for child in children:
        if child.process.poll() is None:
            try:
                os.killpg(child.process.pid, signum)
            except ProcessLookupError:
                pass
    deadline = time.time() + STOP_GRACE_SECONDS
    for child in children:
        try:
            child.process.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.process.wait()


HEARTBEAT_SECONDS = 60  # a progress line at least this often while runs train


def _progress_line(running, pending, durations, workers, runs_dir) -> str:
    """'training SAM seed 3 (epoch 12/40), SGD seed 4 (epoch 2/40); 5 waiting; about 6 min left': the runs now
    training with their epoch (from their summary.json), what waits, and an ETA from this pool's measured runs."""
    from .store import run_dir
    from .train import resolve_device
    now = []
    for child in running:
        c = child.config
        try:
            epoch = json.loads((run_dir(c, resolve_device(c.device), runs_dir) / "summary.json").read_text()).get(
                "epochs_done")
        except (OSError, ValueError, AttributeError):
            epoch = None
        now.append(f"{c.label()} seed {c.seed} (epoch {epoch if epoch is not None else 0}/{c.epochs})")
    eta = ""
    if durations:
        per_run = sum(durations) / len(durations)
        left = per_run * (len(pending) + len(running) * 0.5) / max(1, workers)
        eta = f"; about {left / 60:.1f} min left ({per_run / 60:.1f} min a run here)"
    return f"training {', '.join(now) or 'nothing'}; {len(pending)} waiting{eta}"


def split_available(configs, runs_dir: Path, found, device_of) -> tuple[list, list]:
    """(runs, pending): the configs whose finished (or diverged) run an export (``found``) or the store holds, read
    here, and the rest, to train. ``device_of(config)``: the device its run trains on (its store folder's)."""
    from .store import CorruptRun, load_run, note_use, run_dir
    runs, pending = [], []
    for config in configs:
        elsewhere = found(config) if found else None
        if elsewhere is not None:
            runs.append(elsewhere)
            continue
        path = run_dir(config, device_of(config), runs_dir)
        try:
            stored = load_run(path, missing_ok=True)
        except CorruptRun:  # the run's own process deals with it, under the run's lock
            stored = None
        if stored is not None and stored.summary.get("status") in ("finished", "diverged"):
            note_use("store", path)
            runs.append(stored)
        else:
            pending.append(config)
    return runs, pending


def run_pool(configs: list[RunConfig], runs_dir=None, workers: int = 1, deadline: float | None = None,
             log=None, profile: str | None = None, found=None) -> tuple[list, bool, int]:
    """Train (or read back) every config, ``workers`` child processes at a time; returns (runs, complete,
    trained), ``trained`` the runs these children trained (not read back). After ``deadline`` (a time.time())
    no new run starts; the ones under way finish. ``found(config)``: a stored run from elsewhere (an export),
    or None. A child that ends other than finished or diverged stops the others and raises ``RunFailed``."""
    from .signals import Terminated
    from .store import default_runs_dir, load_run, run_dir
    from .train import resolve_device
    if not (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        raise ValueError(f"--workers: expected an integer >= 1, got {workers!r}")
    runs_dir = Path(runs_dir or default_runs_dir()).resolve()  # the children get the same store whatever their cwd
    log = log or (lambda line: print(line, flush=True))
    runs, pending = split_available(configs, runs_dir, found, lambda c: resolve_device(c.device))
    trained = 0
    started, running, durations, heartbeat = time.time(), [], [], time.time()
    try:
        while pending or running:
            while pending and len(running) < workers and (deadline is None or time.time() < deadline):
                config = pending.pop(0)
                stderr, stdout = tempfile.TemporaryFile(), tempfile.TemporaryFile()
                # A signal between the fork and the bookkeeping would leave a child nobody stops: it waits.
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                try:
                    process = subprocess.Popen([sys.executable, *train_argv(config, profile, runs_dir)],
                                               stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                               start_new_session=True,
                                               preexec_fn=lambda p=os.getpid(): _end_with_parent(p))
                    running.append(_Child(config, process, stderr, stdout, time.time()))
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                log(f"started {config.label()} seed {config.seed} ({len(running)} training, {len(pending)} waiting)")
                heartbeat = time.time()
            if not running:
                break
            time.sleep(0.2)
            if time.time() - heartbeat > HEARTBEAT_SECONDS:
                log(_progress_line(running, pending, durations, workers, runs_dir))
                heartbeat = time.time()
            for child in [c for c in running if c.process.poll() is not None]:
                running.remove(child)
                code, config = child.process.returncode, child.config
                path = run_dir(config, resolve_device(config.device), runs_dir)
                if code not in (0, 1):  # 1: diverged, a result like any other
                    how = f"was killed by {_signal_name(-code)}" if code < 0 else f"ended with exit code {code}"
                    detail = "" if code < 0 else f": {child.last_error()}"
                    study_code = 128 - code if code < 0 else code
                    raise RunFailed(f"{config.label()} seed {config.seed} ({path}) {how}{detail}. The other runs were "
                                    f"stopped, each at its last checkpoint; run the same command again to resume",
                                    study_code)
                run_ = load_run(path)
                runs.append(run_)
                trained += child.trained()
                s = run_.summary
                if child.trained():  # the process's whole life, start-up included: what the ETA needs
                    durations.append(time.time() - child.started)
                log(f"[{len(runs)}/{len(configs)}, {time.time() - started:.0f} s] {config.label()} seed "
                    f"{config.seed}: {s.get('status')}, val {100 * (s.get('val_acc') or float('nan')):.2f} %, "
                    f"test {100 * (s.get('test_acc') or float('nan')):.2f} %, {s.get('wall_seconds') or 0:.0f} s")
                if running or pending:
                    log(_progress_line(running, pending, durations, workers, runs_dir))
                heartbeat = time.time()
    except KeyboardInterrupt:
        _stop(running, signal.SIGINT)
        raise
    except Terminated:
        _stop(running, signal.SIGTERM)
        raise
    finally:
        _stop(running, signal.SIGTERM)  # whatever else ended the loop: no child outlives it
    return runs, not pending, trained
