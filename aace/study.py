"""The tuned comparison as one study: rho chosen per method on a validation split, then fresh seeds at the
chosen rhos, with SGD beside them.

``python -m aace study --profile gpu`` runs it in a pool of worker processes (small models leave a large GPU
idle, so several runs share it), each run through the same ``aace.train.run`` a user calls, so that the run
store makes the study resumable: run the command again after an interruption and only what is missing trains.
``--print-commands`` prints one ``python -m aace train`` command per run instead, for a job array.
``--export DIR`` writes a compact copy with provenance (no checkpoints) that the book reads (``aace.results``).
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime
import json
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import RunConfig, profile_config
from .experiments import Arm

# The arms whose rho is tuned, and the baseline, by key. 'aace_normalised' takes AACE's direction with SAM's
# normalised step, so that direction and step length are separated by design.
TUNED_ARMS = {"sam": Arm.of("SAM", method="sam"),
              "aace": Arm.of("SAM+AACE", method="aace"),
              "aace_normalised": Arm.of("SAM+AACE, normalised step", method="aace", normalize=True)}
BASELINE_ARMS = {"sgd": Arm.of("SGD", method="sgd")}
ALL_ARMS = {**BASELINE_ARMS, **TUNED_ARMS}


@dataclass(frozen=True)
class Plan:
    """A study: the rho grid of each tuned arm, the tuning and the final seeds, settings over the profile, and
    the arms of the final comparison (every arm by default)."""
    profile: str
    rhos: dict
    tuning_seeds: tuple
    final_seeds: tuple
    settings: dict = field(default_factory=dict)
    final_arms: tuple = tuple(ALL_ARMS)


PLANS = {
    # SAM's normalised step from 0.02 to 0.5 (0.05 is the SAM paper's); AACE's unnormalised step from 0.01 to the
    # paper's 0.2, where it no longer fits its training set on the CPU profile; 2 tuning seeds, 8 final seeds.
    "gpu": Plan("gpu", rhos={"sam": (0.02, 0.05, 0.1, 0.2, 0.5), "aace": (0.01, 0.02, 0.05, 0.1, 0.2),
                             "aace_normalised": (0.02, 0.05, 0.1, 0.2, 0.5)},
                tuning_seeds=(100, 101), final_seeds=tuple(range(8))),
    # The book's own comparison on 2 CPU cores (about 30 minutes): 4 rhos per arm on 2 seeds, then 8 fresh seeds
    # of SGD, SAM and SAM+AACE. The normalised AACE step is tuned beside them (direction against step length)
    # but not carried into the final comparison, which would cost 8 more runs.
    "cpu": Plan("cpu", rhos={"sam": (0.02, 0.05, 0.2, 0.5), "aace": (0.02, 0.05, 0.1, 0.2),
                             "aace_normalised": (0.02, 0.05, 0.2, 0.5)},
                tuning_seeds=(100, 101), final_seeds=tuple(range(8)), final_arms=("sgd", "sam", "aace")),
    # The same machinery in seconds, for the tests and for trying the commands (the smoke profile as it is, so
    # that the pages' smoke runs are the study's).
    "smoke": Plan("smoke", rhos={"sam": (0.05, 0.2), "aace": (0.05, 0.2), "aace_normalised": (0.05, 0.2)},
                  tuning_seeds=(100,), final_seeds=(0, 1)),
}


def plan_for(profile: str) -> Plan:
    if profile not in PLANS:
        raise ValueError(f"--profile: the study is defined for {list(PLANS)}, got {profile!r}")
    return PLANS[profile]


def arm_config(plan: Plan, key: str, seed: int, rho: float | None = None, **overrides) -> RunConfig:
    settings = {**plan.settings, **overrides, **dict(ALL_ARMS[key].settings), "seed": seed}
    if rho is not None:
        settings["rho"] = rho
    return profile_config(plan.profile, **settings)


def tuning_configs(plan: Plan, **overrides) -> list[RunConfig]:
    return [arm_config(plan, key, seed, rho, **overrides) for key, rhos in plan.rhos.items() for rho in rhos
            for seed in plan.tuning_seeds]


def final_configs(plan: Plan, chosen: dict | None, **overrides) -> list[RunConfig]:
    """The baseline's final runs, and the tuned arms' at their chosen rho once ``chosen`` ({key: rho}) is known."""
    keys = [k for k in plan.final_arms if k in BASELINE_ARMS or (chosen and k in TUNED_ARMS)]
    return [arm_config(plan, key, seed, (chosen or {}).get(key), **overrides) for key in keys
            for seed in plan.final_seeds]


def arm_key(config: RunConfig) -> str:
    """Which arm a config belongs to (the inverse of ``arm_config``)."""
    if config.method == "sgd":
        return "sgd"
    if config.method == "sam":
        return "sam"
    return "aace_normalised" if config.normalize else "aace"


def choose_rhos(plan: Plan, runs) -> dict:
    """{arm key: {"rho", "val_acc", "table"}}: per arm, the rho with the best mean final validation accuracy
    over the tuning seeds. A diverged run counts as chance accuracy; ties go to the smaller rho."""
    out = {}
    for key, rhos in plan.rhos.items():
        table = {}
        for rho in rhos:
            accs = [float(r.summary.get("val_acc", 0.0)) if r.finished else 0.0 for r in runs
                    if arm_key(r.config) == key and r.config.rho == rho and r.config.seed in plan.tuning_seeds]
            if len(accs) != len(plan.tuning_seeds):
                raise ValueError(f"study: the tuning runs of {key} at rho {rho} are incomplete "
                                 f"({len(accs)} of {len(plan.tuning_seeds)}); run the study to finish them")
            table[rho] = sum(accs) / len(accs)
        best = max(rhos, key=lambda r: (table[r], -r))
        out[key] = {"rho": best, "val_acc": table[best], "table": {str(r): a for r, a in table.items()}}
    return out


# ----------------------------------------------------------------------------- the worker pool

def _train_one(config_dict: dict, runs_dir: str) -> str:
    from .train import run
    return str(run(RunConfig(**config_dict), runs_dir, progress=False).path)


def run_pool(configs: list[RunConfig], runs_dir, workers: int = 1, deadline: float | None = None,
             log=print) -> tuple[list, bool]:
    """Train (or read back) every config, ``workers`` at a time in processes of their own; returns (runs,
    complete). After ``deadline`` (a time.time()) no new run starts; the ones under way finish."""
    from .store import load_run
    if not (isinstance(workers, int) and workers >= 1):
        raise ValueError(f"--workers: expected an integer >= 1, got {workers!r}")
    from .store import default_runs_dir
    from .train import is_stored, run
    runs_dir = Path(runs_dir or default_runs_dir()).resolve()  # the workers get the same store whatever their cwd
    # What the store holds is read here; only the rest goes to the pool (no processes start when nothing trains).
    stored = [is_stored(c, runs_dir) for c in configs]
    runs = [run(c, runs_dir, progress=False) for c, s in zip(configs, stored) if s]
    pending, started = [c for c, s in zip(configs, stored) if not s], time.time()
    if not pending:
        return runs, True
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with cf.ProcessPoolExecutor(workers, mp_context=context) as pool:
        running = {}
        while pending or running:
            while pending and len(running) < workers and (deadline is None or time.time() < deadline):
                config = pending.pop(0)
                running[pool.submit(_train_one, config.to_dict(), str(runs_dir))] = config
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                config = running.pop(future)
                run_ = load_run(Path(future.result()))
                runs.append(run_)
                s = run_.summary
                log(f"[{len(runs)}/{len(configs)}, {time.time() - started:.0f} s] {config.label()} seed {config.seed}: "
                    f"{s.get('status')}, val {100 * s.get('val_acc', float('nan')):.2f} %, "
                    f"test {100 * s.get('test_acc', float('nan')):.2f} %, "
                    f"{s.get('images_per_second', 0):.0f} img/s, {s.get('wall_seconds', 0):.0f} s")
    return runs, not pending


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

def run_study(profile: str, runs_dir=None, workers: int = 1, stop_after: float | None = None, log=print,
              plan: Plan | None = None, **overrides) -> dict:
    """Tuning grid and SGD first, then the tuned arms' final seeds at their chosen rhos. Returns the study's
    record (what ``export`` writes as study.json), with ``complete`` False when ``stop_after`` seconds ran out.
    ``plan``: another plan than the profile's (other seeds, say)."""
    from .store import default_runs_dir
    plan = plan or plan_for(profile)
    runs_dir = Path(runs_dir or default_runs_dir())
    runs_dir.mkdir(parents=True, exist_ok=True)
    # Each worker gets its share of the cores, set in the configs (unless the profile fixes it): on the CPU the
    # thread count is part of a run's hash, so that any process (this one, a later invocation) finds the runs.
    if profile_config(profile).threads is None:
        overrides.setdefault("threads", max(1, (os.cpu_count() or 1) // workers))
    start = time.time()
    deadline = None if stop_after is None else start + stop_after
    from .train import is_stored
    trained = 0  # an invocation that only reads the store leaves no record (the store may be read-only)
    with GPUSampler() as sampler:
        first = tuning_configs(plan, **overrides) + final_configs(plan, None, **overrides)
        trained += sum(not is_stored(c, runs_dir) for c in first)
        log(f"study {profile}: {len(first)} runs of tuning and SGD, {workers} at a time, store {runs_dir}")
        runs, complete = run_pool(first, runs_dir, workers, deadline, log)
        chosen = None
        if complete:
            chosen = choose_rhos(plan, runs)
            log("chosen rho: " + ", ".join(f"{k} {v['rho']:g} (val {100 * v['val_acc']:.2f} %)" for k, v in chosen.items()))
            rest = [c for c in final_configs(plan, {k: v["rho"] for k, v in chosen.items()}, **overrides)
                    if arm_key(c) not in BASELINE_ARMS]
            trained += sum(not is_stored(c, runs_dir) for c in rest)
            more, complete = run_pool(rest, runs_dir, workers, deadline, log)
            runs += more
    wall = time.time() - start
    entry = {"started": _utc(start), "wall_seconds": wall, "workers": workers, "gpu": sampler.summary(),
             "complete": complete, "runs_trained": trained}
    history = _append_history(runs_dir, profile, entry) if trained else _read_history(runs_dir, profile) or [entry]
    log(f"study {profile}: {'complete' if complete else 'stopped at its time limit; run again to go on'} "
        f"after {wall:.0f} s ({sum(h['wall_seconds'] for h in history):.0f} s over {len(history)} invocation(s))")
    return {"profile": profile, "plan": _plan_record(plan), "overrides": overrides, "chosen": chosen,
            "complete": complete, "invocations": history, "runs": runs}


def _utc(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def _plan_record(plan: Plan) -> dict:
    return {"profile": plan.profile, "rhos": {k: list(v) for k, v in plan.rhos.items()},
            "tuning_seeds": list(plan.tuning_seeds), "final_seeds": list(plan.final_seeds), "settings": plan.settings,
            "final_arms": list(plan.final_arms)}


def _read_history(runs_dir: Path, profile: str) -> list:
    try:
        return json.loads((runs_dir / f"study-{profile}.json").read_text())
    except (OSError, ValueError):
        return []


def _append_history(runs_dir: Path, profile: str, entry: dict) -> list:
    """Each invocation's wall time and GPU use, kept in the store, so that a resumed study adds them up."""
    path = runs_dir / f"study-{profile}.json"
    history = _read_history(runs_dir, profile)
    history.append(entry)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(history, indent=2))
    os.replace(tmp, path)
    return history


def train_command(config: RunConfig, profile: str, runs_dir=None) -> str:
    """The ``python -m aace train`` command that trains one config: the profile and the fields it changes."""
    base = profile_config(profile).to_dict()
    always = ("method", "rho", "normalize", "seed")  # explicit: a method's defaults would change rho otherwise
    flags = [f"--{k.replace('_', '-')} {'none' if v is None else v}" for k, v in config.to_dict().items()
             if v != base[k] or k in always]
    store = f" --runs-dir {runs_dir}" if runs_dir else ""
    return f"python -m aace train --profile {profile}{store} --no-progress " + " ".join(flags)
