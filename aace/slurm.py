"""The Slurm executor: a study's runs as one job array, submitted with submitit, each array task running the
``python -m aace train ...`` command that ``study --print-commands`` prints (``pool.train_argv``), so that a run
trained on the cluster and the same config trained by the local pool are one run (one hash, one store folder).

The run store, on a filesystem the login node and the compute nodes share, is the only channel: a job writes its
run there (under the run's lock, so two jobs on one config are serialised) and the study reads it back. Job states
come from ``squeue`` (``-t all`` also lists jobs that ended recently), not ``sacct``, which needs the accounting
database many clusters, and a single-node test cluster, do not run.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig
from .formatting import count
from .pool import RunFailed, split_available, train_argv

# The study's exit code when a job failed, was cancelled or timed out, or waited past the pending limit.
SLURM_FAILED = 7
POLL_SECONDS = 5.0
HEARTBEAT_SECONDS = 60  # a progress line at least this often while jobs wait or train
QUEUED, RUNNING = ("PENDING", "CONFIGURING", "REQUEUED", "RESIZING", "SUSPENDED"), ("RUNNING", "COMPLETING")


@dataclass(frozen=True)
class SlurmOptions:
    """How the study's runs are submitted: one array task per run. ``extra``: further submitit ``SlurmExecutor``
    parameters (account, qos, mem, constraint, setup, additional_parameters, ...) from ``--slurm-config``."""
    partition: str | None = None
    gpus_per_run: int = 0
    cpus_per_run: int = 1
    time_minutes: int = 60
    max_parallel: int = 64
    pending_limit_minutes: float = 60.0
    log_dir: str | None = None  # default: <run store>/slurm
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"--slurm-{name.replace('_minutes', '').replace('_', '-')}: expected {expected}, got "
                             f"{getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if self.partition is not None and not (isinstance(self.partition, str) and self.partition.strip()):
            fail("partition", "a partition name")
        for name, low in (("gpus_per_run", 0), ("cpus_per_run", 1), ("time_minutes", 1), ("max_parallel", 1)):
            if not (is_int(getattr(self, name)) and getattr(self, name) >= low):
                fail(name, f"an integer >= {low}")
        limit = self.pending_limit_minutes
        if not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and math.isfinite(limit) and limit > 0):
            fail("pending_limit_minutes", "a number of minutes > 0")
        if not isinstance(self.extra, dict):
            raise ValueError(f"--slurm-config: expected a JSON object of submitit SlurmExecutor parameters, got "
                             f"{type(self.extra).__name__}")
        clash = sorted(set(self.extra) & set(_OWN_PARAMETERS))
        if clash:
            raise ValueError(f"--slurm-config: {clash} are set by the --slurm-* options; leave them out of the file")

    @staticmethod
    def from_file(path, **options) -> "SlurmOptions":
        """The options with ``extra`` read from a JSON file (``--slurm-config``)."""
        try:
            extra = json.loads(Path(path).read_text())
        except OSError as err:
            raise ValueError(f"--slurm-config {path}: cannot read it ({err.strerror})") from None
        except ValueError as err:
            raise ValueError(f"--slurm-config {path}: not JSON ({err})") from None
        return SlurmOptions(**options, extra=extra)

    def device_type(self, config: RunConfig) -> str:
        """Where a job trains ``config``: the store folder's device (the login node may have no GPU)."""
        if config.device == "cuda" and not self.gpus_per_run:
            raise ValueError("--slurm-gpus-per-run: the runs train on 'cuda'; ask for at least 1 GPU per run")
        if config.device == "auto":
            return "cuda" if self.gpus_per_run else "cpu"
        return config.device


# The executor parameters the options set (a --slurm-config file may not set them again).
_OWN_PARAMETERS = ("partition", "time", "cpus_per_task", "gpus_per_node", "array_parallelism", "job_name",
                   "nodes", "ntasks_per_node")


class TrainJob:
    """What an array task runs: the train command, as a child process whose output goes to the job's log.
    Returns its exit code (0 finished, 1 diverged; anything else is a failure the study reports)."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        print("running: " + " ".join(self.argv), flush=True)
        return subprocess.run(self.argv).returncode


def queue_states(job_ids) -> dict | None:
    """{array task id: (state, reason)} from squeue, each pending range ("12_[3-9%4]") expanded; None when squeue
    cannot be asked (the controller is down, say)."""
    from submitit.slurm.slurm import read_job_id
    arrays = sorted({str(j).split("_")[0] for j in job_ids})
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(arrays), "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3:
            continue
        for entry in read_job_id(parts[0]):
            main, *span = entry
            ids = [main] if not span else [f"{main}_{i}" for i in range(int(span[0]), int(span[-1]) + 1)]
            for job_id in ids:
                states[job_id] = (parts[1], parts[2])
    return states


def _cancel(job_ids, pending_only=False) -> None:
    arrays = sorted({str(j).split("_")[0] for j in job_ids})
    if arrays:
        subprocess.run(["scancel", *(["--state=PENDING"] if pending_only else []), *arrays],
                       capture_output=True, timeout=60)


def run_slurm(configs: list[RunConfig], runs_dir, options: SlurmOptions, deadline: float | None = None, log=None,
              profile: str | None = None, found=None) -> tuple[list, bool, int]:
    """``pool.run_pool``'s contract on a Slurm cluster: every config not already stored (or ``found``) runs as one
    task of one job array; returns (runs, complete, trained). After ``deadline`` the tasks still queued are
    cancelled (those running finish). A task that fails, is cancelled or times out is reported in one line with
    its job id and log, the others go on, and ``RunFailed`` ends the call; so does a queue where nothing has run
    for ``pending_limit_minutes``. Ctrl-C or SIGTERM cancels the array and says so."""
    import submitit
    from .signals import Terminated
    from .store import load_run, run_dir
    import torch
    log = log or (lambda line: print(line, flush=True))
    runs_dir = Path(runs_dir).resolve()
    device = {c: torch.device(options.device_type(c)) for c in configs}
    runs, pending = split_available(configs, runs_dir, found, lambda c: device[c])
    if not pending:
        return runs, True, 0
    folder = Path(options.log_dir or runs_dir / "slurm").resolve()
    executor = submitit.SlurmExecutor(folder=folder / "%j")
    executor.update_parameters(job_name=f"aace-{profile or 'study'}", time=options.time_minutes,
                               cpus_per_task=options.cpus_per_run, array_parallelism=options.max_parallel,
                               nodes=1, ntasks_per_node=1,
                               **({"partition": options.partition} if options.partition else {}),
                               **({"gpus_per_node": options.gpus_per_run} if options.gpus_per_run else {}),
                               **options.extra)
    with executor.batch():
        submitted = [(config, executor.submit(TrainJob([sys.executable, *train_argv(config, profile, runs_dir)])))
                     for config in pending]
    jobs = {job.job_id: (config, job) for config, job in submitted}
    array = submitted[0][1].job_id.split("_")[0]
    log(f"submitted {count(len(jobs), 'run')} as Slurm job array {array} ({options.cpus_per_run} CPUs"
        f"{f', {options.gpus_per_run} GPUs' if options.gpus_per_run else ''} and {options.time_minutes} min a run, "
        f"at most {options.max_parallel} at once); logs in {folder}")
    waiting, trained, failures, cancelled_late = dict(jobs), 0, [], False
    submitted_at = last_progress = time.time()
    heartbeat, states, last_line = 0.0, {}, ""
    try:
        while waiting:
            now = time.time()
            asked = queue_states(waiting)
            states = asked if asked is not None else states
            if deadline is not None and now >= deadline and not cancelled_late:
                _cancel(waiting, pending_only=True)
                cancelled_late = True
                log(f"--stop-after: cancelled the runs still queued in array {array}; the running ones finish")
            for job_id in list(waiting):
                config, job = waiting[job_id]
                state, reason = states.get(job_id, ("", ""))
                if job.paths.result_pickle.exists():
                    code = _job_code(job)
                elif state in QUEUED or state in RUNNING or (asked is None and job_id in states) or \
                        (not state and now - submitted_at < 60):  # a task squeue has not listed yet
                    continue
                else:
                    code = None
                del waiting[job_id]
                path = run_dir(config, device[config], runs_dir)
                if code in (0, 1):  # 1: diverged, a result like any other
                    run_ = load_run(path)
                    runs.append(run_)
                    trained += _trained_by(job)
                    s = run_.summary
                    log(f"[{len(runs)}/{len(configs)}] {config.label()} seed {config.seed} (job {job_id}): "
                        f"{s.get('status')}, val {100 * (s.get('val_acc') or float('nan')):.2f} %, test "
                        f"{100 * (s.get('test_acc') or float('nan')):.2f} %, {s.get('wall_seconds') or 0:.0f} s")
                elif cancelled_late and state == "CANCELLED" and not path.exists():
                    continue  # never started: the next invocation submits it again
                else:
                    how = _what_happened(code, state)
                    line = (f"{config.label()} seed {config.seed}: Slurm job {job_id} {how} (log {job.paths.stdout}"
                            f"); its run resumes from its last checkpoint ({path}) when the study is run again")
                    failures.append(line)
                    log(f"FAILED: {line}")
                last_progress = now
            if any(states.get(j, ("",))[0] in RUNNING for j in waiting):
                last_progress = now
            elif waiting and now - last_progress > 60 * options.pending_limit_minutes:
                reasons = sorted({states.get(j, ("", "unknown"))[1] or "unknown" for j in waiting})
                _cancel(waiting)
                raise RunFailed(f"Slurm job array {array}: {len(waiting)} runs waited {options.pending_limit_minutes:g} "
                                f"min with none running (squeue's reason: {', '.join(reasons)}); cancelled them. "
                                f"Check the partition and the resources asked (--slurm-*), then run the study again",
                                SLURM_FAILED)
            line = _progress_line(array, waiting, states, len(jobs), failures)
            if waiting and (line != last_line or now - heartbeat > HEARTBEAT_SECONDS):
                log(line)
                last_line, heartbeat = line, now
            if waiting:
                time.sleep(POLL_SECONDS)
    except (KeyboardInterrupt, Terminated):
        _cancel(waiting)
        log(f"cancelled Slurm job array {array} ({len(waiting)} runs unfinished; each resumes from its last "
            f"checkpoint when the study is run again)")
        raise
    if failures:
        raise RunFailed(f"{len(failures)} of the {len(jobs)} runs of Slurm job array {array} failed (the lines above "
                        f"name each job and its log); run the study again to resume them", SLURM_FAILED)
    return runs, len(runs) == len(configs), trained


def _trained_by(job) -> bool:
    """Whether the job trained its run, rather than read it back (another study on the same store ran it): the train
    command's line in the job's log, as the local pool reads it from its child."""
    try:
        return " (trained): " in Path(job.paths.stdout).read_text(errors="replace")
    except OSError:
        return False


def _job_code(job):
    """The train command's exit code, or a sentence when the task itself failed (submitit's traceback)."""
    try:
        return job.result()
    except Exception as err:  # noqa: BLE001 - the task's error is the report
        last = [line for line in str(err).splitlines() if line.strip()]
        return f"failed before its run started ({last[-1].strip() if last else type(err).__name__})"


def _what_happened(code, state: str) -> str:
    """'was cancelled (Slurm state CANCELLED; its run stopped with exit code 143)', and the like."""
    told = f"Slurm state {state}" if state and state not in RUNNING + ("COMPLETED",) else ""
    if isinstance(code, str):
        return code + (f" ({told})" if told else "")
    if code is None:
        return f"left the queue without a result ({told or 'its state aged out of squeue'})"
    stopped = {130: "SIGINT", 143: "SIGTERM"}.get(code)
    how = f"was stopped by {stopped} (cancelled, pre-empted or out of time)" if stopped else f"ended with exit code {code}"
    return how + (f" ({told})" if told else "")


def _progress_line(array, waiting, states, total, failures) -> str:
    counts = {"queued": 0, "running": 0}
    for job_id in waiting:
        state = states.get(job_id, ("PENDING",))[0]
        counts["running" if state in RUNNING else "queued"] += 1
    done = total - len(waiting) - len(failures)
    return (f"Slurm array {array}: {counts['queued']} queued, {counts['running']} running, {done} done, "
            f"{len(failures)} failed")
