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
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from .config import Arm, RunConfig, profile_config
from .pool import run_pool

# The arms whose setting is tuned, and the baseline, by key. 'aace_normalised' takes AACE's direction with SAM's
# normalised step, so that direction and step length are separated by design; 'sgd_ls' is SGD with its label
# smoothing tuned on the same split: is SAM+AACE's gain its direction, or just more regularisation?
TUNED_ARMS = {"sgd_ls": Arm.of("SGD, tuned label smoothing", method="sgd"),
              "sam": Arm.of("SAM", method="sam"),
              "aace": Arm.of("SAM+AACE", method="aace"),
              "aace_normalised": Arm.of("SAM+AACE, normalised step", method="aace", normalize=True)}
BASELINE_ARMS = {"sgd": Arm.of("SGD", method="sgd")}
# Crossed arms (issue 30, item 3): an arm's method at another arm's chosen value, so that direction and step
# length can be told apart: {key: (the arm whose method it runs, the arm whose chosen rho it takes)}.
CROSSED = {"sam_at_normalised_rho": ("sam", "aace_normalised"),
           "aace_normalised_at_sam_rho": ("aace_normalised", "sam")}
CROSSED_ARMS = {"sam_at_normalised_rho": Arm.of("SAM at normalised AACE's rho", method="sam"),
                "aace_normalised_at_sam_rho": Arm.of("SAM+AACE normalised at SAM's rho", method="aace", normalize=True)}
ALL_ARMS = {**BASELINE_ARMS, **TUNED_ARMS, **CROSSED_ARMS}
# The field each tuned arm's grid sets (rho unless named here).
TUNED_FIELD = {"sgd_ls": "label_smoothing"}


def tuned_field(key: str) -> str:
    return TUNED_FIELD.get(CROSSED.get(key, (key,))[0], "rho")


@dataclass(frozen=True)
class Plan:
    """A study: the grid of each tuned arm (its rho, or the field ``TUNED_FIELD`` names), the tuning and the
    final seeds, settings over the profile, and the arms of the final comparison (every arm by default)."""
    profile: str
    rhos: dict
    tuning_seeds: tuple
    final_seeds: tuple
    settings: dict = field(default_factory=dict)
    final_arms: tuple = tuple({**BASELINE_ARMS, **TUNED_ARMS})


# The noise testbed's grids (issue 30, item 2, declared before its runs): every arm's grid has neighbours within a
# factor of 2 of its first study's choice (SAM 0.2, SAM+AACE 1.0, normalised 0.5, label smoothing 0.8) and of the
# values next to it, SAM's as fine near its choice as AACE's.
_NOISE_GRIDS = {"sgd_ls": (0.1, 0.2, 0.4, 0.6, 0.8, 0.9), "sam": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0),
                "aace": (0.1, 0.2, 0.5, 0.7, 1.0, 1.5, 2.0),
                "aace_normalised": (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 2.0)}
PLANS = {
    # SAM's normalised step from 0.02 to 0.5 (0.05 is the SAM paper's); AACE's unnormalised step from 0.01 to the
    # paper's 0.2, where it no longer fits its training set on the CPU profile; 2 tuning seeds, 8 final seeds.
    "gpu": Plan("gpu", rhos={"sam": (0.02, 0.05, 0.1, 0.2, 0.5), "aace": (0.01, 0.02, 0.05, 0.1, 0.2),
                             "aace_normalised": (0.02, 0.05, 0.1, 0.2, 0.5)},
                tuning_seeds=(100, 101), final_seeds=tuple(range(8)), final_arms=("sgd", "sam", "aace", "aace_normalised")),
    # The clean reference study (issue 23), run once and committed as results/cpu-fashion-mnist: every grid
    # reaches below the value aace 0.4.0 chose at its lowest end (SAM 0.02), so that each chosen value can be
    # interior; 30 fresh paired seeds, which at the paired SD of 0.79 points measured on aace 0.4.0 give a
    # minimum detectable SAM+AACE - SAM effect of about 0.5 points at the Holm-adjusted alpha of its family.
    # Label smoothing was extended to 0.5 after its first grid's choice, 0.2, sat at the top end (item 3).
    # Exact ties (issue 30, item 4) moved label smoothing's choice to 0.02, the low end; 0.01 and 0.005 extended it, and
    # when 0.005 (mean validation 81.15 %) became the low end in turn, 0.002 and 0.001.
    "cpu-reference": Plan("cpu", rhos={"sgd_ls": (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5), "sam": (0.005, 0.01, 0.02, 0.05, 0.1),
                             "aace": (0.01, 0.02, 0.05, 0.1, 0.2), "aace_normalised": (0.005, 0.01, 0.02, 0.05, 0.1)},
                tuning_seeds=(100, 101), final_seeds=tuple(range(30))),
    # The label-noise reference study (results/cpu-fashion-mnist-noise-50): grids around the pilot's best values
    # (SAM 0.2 of 0.05-1.0; SAM+AACE 0.5 of 0.05-0.5, so up to 2.0). Label smoothing (to 0.9) and normalised AACE
    # (to 2.0) were extended after their first grids' choices, 0.6 and 0.5, sat at the top end (issue 23, item 3).
    # First run with 10 final seeds, whose paired spread gave a SAM+AACE - SAM MDE of 2.3 points; extended to 50
    # (the same tuning and seeds 0-9 included), expecting about 0.9 points against its declared target of 1.0
    # (aace.reference, item 7). Hours on 2 cores, over sessions.
    "cpu-noise-power": Plan("cpu-noise", rhos={"sgd_ls": (0.1, 0.2, 0.4, 0.6, 0.8, 0.9), "sam": (0.05, 0.1, 0.2, 0.5),
                                               "aace": (0.1, 0.2, 0.5, 1.0, 2.0),
                                               "aace_normalised": (0.05, 0.1, 0.2, 0.5, 1.0, 2.0)},
                            tuning_seeds=(100, 101), final_seeds=tuple(range(50))),
    # The noise reference study argued like a paper (issue 30, results/cpu-fashion-mnist-noise): the grids above
    # with 3 tuning seeds (a third seed, 102, for every value), the same 50 final seeds, and the crossed arms
    # (SAM at normalised AACE's chosen rho, normalised AACE at SAM's) for direction versus step length. It starts
    # from cpu-noise-power's export (--resume-from): its 292 runs are not trained again.
    "cpu-noise-reference": Plan("cpu-noise", rhos=_NOISE_GRIDS, tuning_seeds=(100, 101, 102),
                                final_seeds=tuple(range(50)), final_arms=(*BASELINE_ARMS, *TUNED_ARMS, *CROSSED)),
    # The paper's scale on a GPU cluster (issue 35; book/gpu.md gives its cost from benchmarks/paper_scale.json):
    # CIFAR-100 with the authors' WRN-28-10 and settings, the SAM paper's protocol (rho from its grid
    # {0.01, ..., 0.5} on a held-out 10 % of the training set, one tuning seed, 5 fresh seeds); SAM+AACE's
    # unnormalised grid around the authors' 0.2. `--model pyramidnet-272-200 --batch-size 64` for their other model.
    "paper": Plan("paper", rhos={"sam": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5), "aace": (0.05, 0.1, 0.2, 0.5, 1.0),
                                 "aace_normalised": (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)},
                  tuning_seeds=(100,), final_seeds=tuple(range(5)), settings={"dataset": "cifar100", "val_subset": 5000},
                  final_arms=("sgd", "sam", "aace", "aace_normalised")),
    # The same machinery in seconds, for the tests and for trying the commands (the smoke profile as it is, so
    # that the pages' smoke runs are the study's).
    "smoke": Plan("smoke", rhos={"sam": (0.05, 0.2), "aace": (0.05, 0.2), "aace_normalised": (0.05, 0.2)},
                  tuning_seeds=(100,), final_seeds=(0, 1), final_arms=("sgd", "sam", "aace", "aace_normalised")),
    # The noise testbed in seconds, every arm of the reference plans (the intro's nbval fixture).
    "smoke-noise": Plan("smoke-noise", rhos={"sgd_ls": (0.1, 0.4), "sam": (0.05, 0.2), "aace": (0.2, 0.5),
                                             "aace_normalised": (0.05, 0.2)},
                        tuning_seeds=(100,), final_seeds=(0, 1, 2), final_arms=(*BASELINE_ARMS, *TUNED_ARMS, *CROSSED)),
}


def plan_for(profile: str) -> Plan:
    if profile not in PLANS:
        raise ValueError(f"--profile: the study is defined for {list(PLANS)}, got {profile!r}")
    return PLANS[profile]


def arm_config(plan: Plan, key: str, seed: int, value: float | None = None, **overrides) -> RunConfig:
    """The config of an arm at a seed; ``value``: its tuned field's value (rho, or ``TUNED_FIELD``'s)."""
    settings = {**plan.settings, **overrides, **dict(ALL_ARMS[key].settings), "seed": seed}
    if value is not None:
        settings[tuned_field(key)] = value
    return profile_config(plan.profile, **settings)


def tuning_configs(plan: Plan, **overrides) -> list[RunConfig]:
    return [arm_config(plan, key, seed, rho, **overrides) for key, rhos in plan.rhos.items() for rho in rhos
            for seed in plan.tuning_seeds]


def final_configs_by_arm(plan: Plan, chosen: dict | None, **overrides) -> dict:
    """{arm key: its final configs}: the baseline's, and once ``chosen`` ({key: value}) is known the tuned arms'
    at their chosen values and the crossed arms' at the values they take (``CROSSED``). Two arms may share runs
    (a crossed arm whose two arms chose the same rho is its own arm)."""
    out = {}
    for key in plan.final_arms:
        if key in CROSSED:
            value = (chosen or {}).get(CROSSED[key][1])
            if value is None:
                continue
            configs = [arm_config(plan, CROSSED[key][0], seed, value, **overrides) for seed in plan.final_seeds]
        elif key in BASELINE_ARMS or (chosen and key in TUNED_ARMS):
            configs = [arm_config(plan, key, seed, (chosen or {}).get(key), **overrides) for seed in plan.final_seeds]
        else:
            continue
        out[key] = configs
    return out


def final_configs(plan: Plan, chosen: dict | None, **overrides) -> list[RunConfig]:
    """``final_configs_by_arm`` as one list, each config once."""
    seen, out = set(), []
    for configs in final_configs_by_arm(plan, chosen, **overrides).values():
        for c in configs:
            if c not in seen:
                seen.add(c)
                out.append(c)
    return out


def arm_key(config: RunConfig) -> str:
    """Which arm a config belongs to (the inverse of ``arm_config``)."""
    if config.method == "sgd":
        return "sgd_ls" if config.label_smoothing else "sgd"
    if config.method == "sam":
        return "sam"
    return "aace_normalised" if config.normalize else "aace"


def tuned_value(key: str, config: RunConfig):
    return getattr(config, tuned_field(key))


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
    from .store import Terminated, default_runs_dir
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
