"""The book's main comparison: SGD, SGD with tuned label smoothing, SAM, SAM+AACE and its normalised step, each
tuned on a validation split, scored over fresh seeds: the clean reference study (``aace.reference``), read from
its committed export; for a profile without one (``paper``), the authors' rhos. The convergence, Table 2, claims,
ablations and introduction pages all read it from here.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from . import experiments as ex
from . import formatting as fmt
from .plans import IMBALANCE_ARMS
from .progress import progress_stream
from .study import ALL_ARMS, TUNED_ARMS, arm_key, plan_for, run_study, tuned_field, tuned_value


@dataclass
class Comparison:
    profile: str
    runs: dict                 # arm name -> the final runs, by seed (SGD, SAM, SAM+AACE[, normalised])
    study: dict | None = None  # the study's record (plan, chosen rhos, every run); None without a plan

    @property
    def tuned(self) -> bool:
        return self.study is not None

    def rho_of(self, key: str) -> float | None:
        """The rho an arm ran with in the final comparison ('sam', 'aace', ...); None for SGD."""
        if key not in TUNED_ARMS and key not in IMBALANCE_ARMS:
            return None
        if self.tuned:
            return self.study["chosen"][key]["rho"] if key in self.study["chosen"] else None
        name = ALL_ARMS[key].name
        return self.runs[name][0].config.rho if name in self.runs else None

    def tuning_frame(self):
        """One row per tuning run: arm, rho, seed, final validation and training accuracy (empty untuned)."""
        import pandas as pd
        if not self.tuned:
            return pd.DataFrame(columns=["arm", "rho", "field", "seed", "val_acc", "train_acc"])
        seeds = set(self.study["plan"]["tuning_seeds"])
        rows = [{"arm": ALL_ARMS[arm_key(r.config)].name, "rho": tuned_value(arm_key(r.config), r.config),
                 "field": tuned_field(arm_key(r.config)),
                 "seed": r.config.seed,
                 "val_acc": r.summary.get("val_acc", float("nan")) if r.finished else float("nan"),
                 "train_acc": r.summary.get("train_acc", float("nan")) if r.finished else float("nan")}
                for r in self.study["runs"] if r.config.seed in seeds
                and (arm_key(r.config) in TUNED_ARMS or arm_key(r.config) in IMBALANCE_ARMS)]
        return pd.DataFrame(rows).sort_values(["arm", "rho", "seed"]).reset_index(drop=True)

    def tuning_table(self):
        """Per arm and rho: mean final validation and training accuracy (%) over the tuning seeds, and
        which rho was chosen."""
        frame = self.tuning_frame()
        table = frame.groupby(["arm", "rho"])[["val_acc", "train_acc"]].mean() * 100
        table.columns = ["validation accuracy %", "training accuracy %"]
        chosen = {ALL_ARMS[k].name: v["rho"] for k, v in self.study["chosen"].items()} if self.tuned else {}
        table["chosen"] = ["◀" if chosen.get(arm) == rho else "" for arm, rho in table.index]
        return table.round(2)

    def by_key(self) -> dict:
        """{arm key ('sgd', 'sam', ...): final runs}."""
        keys = {arm.name: key for key, arm in ALL_ARMS.items()}
        return {keys[name]: rs for name, rs in self.runs.items()}

    def verdicts(self):
        """(arms table, comparisons table): see ``aace.results.verdict_tables``."""
        from .results import verdict_tables
        return verdict_tables(self.by_key())

    def setting(self) -> str:
        """What the comparison ran: data, model, schedule, seeds, rhos and how they were chosen."""
        first = next(iter(self.runs.values()))[0]
        c, seeds = first.config, sorted(r.config.seed for r in next(iter(self.runs.values())))
        rhos = ", ".join(f"{name} {rs[0].config.rho:g}" for name, rs in self.runs.items() if rs[0].config.method != "sgd")
        noise = f" with {100 * c.label_noise:g} % of the training and validation labels noisy" if c.label_noise else ""
        counts = c.class_counts()
        if counts:
            noise += (f" on a long-tailed training subset (imbalance ratio {c.imbalance_ratio:g}: {max(counts)} images of "
                      f"the largest class down to {min(counts)} of the smallest, {sum(counts):,} in all)")
        text = (f"{fmt.dataset(c.dataset)}{noise}, {ex.describe(c)}; final seeds {fmt.seeds(seeds)}; final test "
                f"accuracy on {ex.final_test_size(first):,} test images")
        if not self.tuned:
            return text + f"; the authors' rhos ({rhos}), not tuned here"
        plan = self.study["plan"]
        grid = "; ".join(f"{ALL_ARMS[k].name} {fmt.values(v)}" for k, v in plan["rhos"].items())
        chosen = ", ".join(f"{ALL_ARMS[k].name} {v['rho']:g}" for k, v in self.study["chosen"].items())
        return (text + f". Each tuned value chosen by mean final accuracy on {first.info.get('val_size', 0):,} "
                f"validation images held out of the training pool (tuning seeds {fmt.seeds(plan['tuning_seeds'])}; "
                f"grids: {grid}); chosen: {chosen}")


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def main_comparison(profile: str, seeds=None, overrides=None, runs_dir=None, workers: int | None = None) -> Comparison:
    """The main comparison of a profile. ``cpu`` (and ``smoke``, its nbval copy): the clean reference study, read
    from its committed export (``aace.reference``); with other ``seeds`` or ``overrides`` (RunConfig fields for
    every run) its plan runs again with them, reading whatever the export holds and training only the rest.
    Without a reference study (``paper``): the three arms at their default rhos over the profile's seeds."""
    ex.check_choice("profile", profile, ex.DEFAULT_SEEDS)
    overrides = dict(overrides or {})
    from . import reference
    if profile not in reference.REFERENCES:
        grid = ex.configs(profile, list(ex.MAIN_ARMS.values()), ex.resolve_seeds(profile, seeds), **overrides)
        return Comparison(profile, {arm.name: rs for arm, rs in ex.ensure(grid, runs_dir).items()})
    bed = reference.testbeds(profile)["clean"]
    if seeds is None and not overrides:
        study, runs, problems = reference.read("clean", profile)
        if study is None:
            raise ValueError(f"the clean reference study ({bed.export}) cannot be read: " + "; ".join(problems))
        record = {**study, "runs": runs}
    else:
        from .results import runs_in_export
        plan = plan_for(bed.plan)
        if seeds is not None:
            plan = dataclasses.replace(plan, final_seeds=tuple(ex.resolve_seeds(profile, seeds)))
        directory = reference.ROOT / bed.export
        found, _ = runs_in_export(directory, bed.digest)
        if found is not None:  # the settings the export ran with (its thread count), so that its runs are found
            overrides = {**json.loads((directory / "study.json").read_text()).get("overrides", {}), **overrides}
        terminal = progress_stream()
        try:
            record = run_study(bed.plan, runs_dir, workers or default_workers(), plan=plan, found=found,
                               log=(lambda line: print(line, file=terminal, flush=True)) if terminal else (lambda line: None),
                               **overrides)
        finally:
            if terminal is not None:
                terminal.close()
    from .results import final_runs
    finals = final_runs(record, record["runs"])
    final_arms = record["plan"].get("final_arms", list(ALL_ARMS))
    runs = {ALL_ARMS[k].name: sorted(finals[k], key=lambda r: r.config.seed) for k in final_arms if k in finals}
    return Comparison(profile, runs, record)


def testbed_comparison(testbed: str, profile: str = "cpu") -> Comparison:
    """A reference testbed's study as a ``Comparison``, read from its committed export (nothing trains); a
    ValueError naming the export and its problems when it cannot be read."""
    from . import reference
    from .results import final_runs
    study, runs, problems = reference.read(testbed, profile)
    if study is None:
        bed = reference.testbeds(profile)[testbed]
        raise ValueError(f"the {bed.title} reference study ({bed.export}) cannot be read: " + "; ".join(problems))
    record = {**study, "runs": runs}
    finals = final_runs(record, runs)
    return Comparison(profile, {ALL_ARMS[k].name: sorted(rs, key=lambda r: r.config.seed) for k, rs in finals.items()},
                      record)


def reference_runs(profile: str):
    """``found(config)`` for ``aace.experiments.ensure``: the clean reference study's runs, read in place from its
    export (None for a profile without one), so that a page's configs that the study holds are not trained again."""
    from . import reference
    from .results import runs_in_export
    if profile not in reference.REFERENCES:
        return None
    bed = reference.testbeds(profile)["clean"]
    found, _ = runs_in_export(reference.ROOT / bed.export, bed.digest)
    return found

