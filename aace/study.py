"""The tuned comparison as one study: rho chosen per method on a validation split, then fresh seeds at the
chosen rhos, with SGD beside them.

``python -m aace study --profile gpu`` runs it several runs at a time (small models leave a large GPU idle, so
several runs share it), each as a child process running the ``python -m aace train`` command that
``--print-commands`` prints for a job array (``aace.pool``), so that the run store makes the study resumable:
run the command again after an interruption and only what is missing trains.
``--export DIR`` writes a compact copy with provenance (no checkpoints) that the book reads (``aace.results``).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

from .config import RunConfig, profile_config
from .pool import run_pool

# The plans and their arms live in aace.plans; the study's callers find them here too.
from .plans import (ALL_ARMS, BASELINE_ARMS, CROSSED, CROSSED_ARMS, PLANS, TUNED_ARMS, TUNED_FIELD,  # noqa: F401
                    Plan, arm_config, arm_key, final_configs, final_configs_by_arm, plan_for, tuned_field,
                    tuned_value, tuning_configs)


def chance(config: RunConfig) -> float:
    from .data import DATASETS
    return 1.0 / DATASETS[config.dataset].num_classes


def exact_accuracy(value: float) -> Fraction:
    """An accuracy as the exact fraction of images it counts (correct / evaluated, at most a million images),
    so that means are compared without rounding: (0.804 + 0.815) / 2 ties (0.808 + 0.811) / 2 exactly."""
    return Fraction(value).limit_denominator(10 ** 6)


def choose_rhos(plan: Plan, runs) -> dict:
    """{arm key: {"rho", "field", "val_acc", "table", "edge"}}: per arm, the value of its tuned field ("rho" holds
    it, whichever field it is) with the best mean final validation accuracy over the tuning seeds, the accuracies
    summed as exact fractions (``exact_accuracy``). A diverged run counts as chance accuracy; exact ties go to
    the smaller value. ``edge``: "lowest" or "highest" when the choice is an end of its grid (the optimum may lie
    beyond it: extend the grid), else None."""
    out = {}
    for key, values in plan.rhos.items():
        table = {}
        for value in values:
            accs = [exact_accuracy(float(r.summary.get("val_acc", 0.0))) if r.finished
                    else Fraction(1, round(1 / chance(r.config))) for r in runs
                    if arm_key(r.config) == key and tuned_value(key, r.config) == value
                    and r.config.seed in plan.tuning_seeds]
            if len(accs) != len(plan.tuning_seeds):
                raise ValueError(f"study: the tuning runs of {key} at {tuned_field(key)} {value} are incomplete "
                                 f"({len(accs)} of {len(plan.tuning_seeds)}); run the study to finish them")
            table[value] = sum(accs) / len(accs)
        best = max(values, key=lambda v: (table[v], -v))
        edge = None if len(values) < 3 else "lowest" if best == min(values) else "highest" if best == max(values) \
            else None
        out[key] = {"rho": best, "field": tuned_field(key), "val_acc": float(table[best]),
                    "table": {str(v): float(a) for v, a in table.items()}, "edge": edge}
    return out


def edge_warnings(chosen: dict) -> list[str]:
    """One line per arm whose chosen value is an end of its grid."""
    return [f"{ALL_ARMS[k].name}: the chosen {v.get('field', 'rho')} {v['rho']:g} is the {v['edge']} value of its "
            f"grid; the optimum may lie beyond it (extend the grid)" for k, v in (chosen or {}).items() if v.get("edge")]


# ----------------------------------------------------------------------------- the study

class GPUSampler:
    """GPU utilisation and memory sampled with nvidia-smi every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 2.0):
        self.interval, self.samples, self._stop = interval, [], threading.Event()
        self.available = shutil.which("nvidia-smi") is not None

    def __enter__(self):
        if self.available:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
                util, memory = (float(v) for v in out.stdout.splitlines()[0].split(","))
                self.samples.append((util, memory))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        utils = sorted(u for u, _ in self.samples)
        return {"samples": len(utils), "mean_utilisation_percent": sum(utils) / len(utils),
                "median_utilisation_percent": utils[len(utils) // 2],
                "max_memory_mib": max(m for _, m in self.samples), "interval_seconds": self.interval}


# ----------------------------------------------------------------------------- the study, its commands, its export

# Fields the study sets run by run: as options of ``study`` they would contradict its plan.
STUDY_SETS = {"method": "each arm's method", "rho": "each arm's rho (tuned on the grid)",
              "normalize": "each arm's step", "seed": "the tuning and final seeds of the plan"}


def check_overrides(overrides: dict) -> None:
    """Refuse, by option name, a setting that the study itself sets run by run."""
    for name, what in STUDY_SETS.items():
        if name in overrides:
            raise ValueError(f"--{name}: the study sets {what}; leave it out (every other run setting, such as "
                             f"--label-noise or --epochs, applies to all of the study's runs)")


def check_stop_after(minutes) -> None:
    if minutes is not None and not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes >= 0):
        raise ValueError(f"--stop-after: expected a finite number of minutes >= 0, got {minutes!r}")


def say(line: str) -> None:
    """A progress line, at once (a log file or a pipe would otherwise hold it back)."""
    print(line, flush=True)


def run_study(profile: str, runs_dir=None, workers: int = 1, stop_after: float | None = None, log=say,
              plan: Plan | None = None, found=None, earlier_invocations=(), slurm=None, **overrides) -> dict:
    """Tuning grid and SGD first, then the tuned arms' final seeds at their chosen rhos. Returns the study's
    record (what ``export`` writes as study.json), with ``complete`` False when ``stop_after`` seconds ran out.
    ``plan``: another plan than the profile's (other seeds, say). ``found(config)``: a finished run read in
    place from elsewhere (a committed partial export), else None; ``earlier_invocations``: that export's history.
    ``slurm``: an ``aace.slurm.SlurmOptions`` to run each phase as a Slurm job array instead of the local pool.
    An invocation stopped by a signal or a failed run is recorded in the history before the error goes on."""
    from .signals import Terminated
    from .store import default_runs_dir
    check_overrides(overrides)
    plan = plan or plan_for(profile)
    if stop_after is not None:
        check_stop_after(stop_after / 60)
    runs_dir = Path(runs_dir or default_runs_dir())
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Each worker gets its share of the cores, set in the configs (unless the profile fixes it): on the CPU the
    # thread count is part of a run's hash, so that any process (this one, a later invocation) finds the runs.
    if profile_config(plan.profile).threads is None:
        overrides.setdefault("threads", slurm.cpus_per_run if slurm else max(1, (os.cpu_count() or 1) // workers))
    first = tuning_configs(plan, **overrides) + final_configs(plan, None, **overrides)  # validates the settings
    start = time.time()
    deadline = None if stop_after is None else start + stop_after
    trained, chosen, complete, ended = 0, None, False, None
    sampler = GPUSampler()

    def execute(configs):
        if slurm is not None:
            from .slurm import run_slurm
            return run_slurm(configs, runs_dir, slurm, deadline, log, plan.profile, found)
        return run_pool(configs, runs_dir, workers, deadline, log, plan.profile, found)
    try:
        with sampler:
            how = "as Slurm job arrays" if slurm else f"{workers} at a time"
            log(f"study {profile}: {len(first)} runs of tuning and SGD, {how}, store {runs_dir}")
            runs, complete, n = execute(first)
            trained += n
            if complete:
                chosen = choose_rhos(plan, runs)
                log("chosen: " + ", ".join(f"{k} {v['field']} {v['rho']:g} (val {100 * v['val_acc']:.2f} %)"
                                           for k, v in chosen.items()))
                for warning in edge_warnings(chosen):
                    log(f"WARNING: {warning}")
                rest = [c for c in final_configs(plan, {k: v["rho"] for k, v in chosen.items()}, **overrides)
                        if arm_key(c) not in BASELINE_ARMS]
                more, complete, n = execute(rest)
                trained += n
                runs += more
    except (KeyboardInterrupt, Terminated, Exception) as err:
        ended = {KeyboardInterrupt: "SIGINT", Terminated: "SIGTERM"}.get(type(err), f"error: {err}")
        complete = False  # stopped in the final runs, after a complete tuning phase, is still incomplete
        raise
    finally:
        entry = {"started": _utc(start), "wall_seconds": time.time() - start, "workers": workers,
                 **({"executor": "slurm", "slurm": dataclasses.asdict(slurm)} if slurm else {}),
                 "gpu": sampler.summary(), "complete": complete, "runs_trained": trained}
        if ended:
            entry["ended"] = ended
        # An invocation that only read the store leaves no record (the store may be read-only).
        if trained or ended:
            try:
                history = _append_history(runs_dir, profile, entry)
            except OSError:
                if not ended:
                    raise
                history = []  # the error that stopped the study is the one to report
        else:
            history = _read_history(runs_dir, profile) or [entry]
    history = _merged(list(earlier_invocations), history)
    wall = entry["wall_seconds"]
    log(f"study {profile}: {'complete' if complete else 'stopped at its time limit; run again to go on'} "
        f"after {wall:.0f} s ({sum(h['wall_seconds'] for h in history):.0f} s over {len(history)} invocation(s))")
    return {"profile": profile, "plan": _plan_record(plan), "overrides": overrides, "chosen": chosen,
            "complete": complete, "invocations": history, "runs": runs}


def _merged(earlier: list, later: list) -> list:
    """Two invocation histories as one, each invocation once (by its start time), in order."""
    seen, out = set(), []
    for h in sorted(earlier + later, key=lambda h: h.get("started", "")):
        key = (h.get("started"), h.get("wall_seconds"))
        if key not in seen:
            seen.add(key)
            out.append(h)
    return out


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _plan_record(plan: Plan) -> dict:
    return {"profile": plan.profile, "rhos": {k: list(v) for k, v in plan.rhos.items()},
            "tuning_seeds": list(plan.tuning_seeds), "final_seeds": list(plan.final_seeds), "settings": plan.settings,
            "final_arms": list(plan.final_arms)}


def _read_history(runs_dir: Path, profile: str) -> list:
    try:
        history = json.loads((runs_dir / f"study-{profile}.json").read_text())
    except (OSError, ValueError):
        return []
    return [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []


def _append_history(runs_dir: Path, profile: str, entry: dict) -> list:
    """Each invocation's wall time and GPU use, kept in the store, so that a resumed study adds them up."""
    from .store import _atomic_write_text  # cleans up its temporary file and names the path on a full disk
    history = _read_history(runs_dir, profile)
    history.append(entry)
    _atomic_write_text(runs_dir / f"study-{profile}.json", json.dumps(history, indent=2))
    return history
