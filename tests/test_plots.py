"""Figures: one colour per method, whatever else a panel holds."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from aace import plots  # noqa: E402
from aace.config import RunConfig  # noqa: E402
from aace.store import Run  # noqa: E402


def fake(cosine, seed=0):
    metrics = pd.DataFrame({"epoch": [1, 2, 3], "perturbation_cosine": cosine, "test_acc": [0.5, 0.6, 0.7]})
    return Run(path=None, config=RunConfig(seed=seed), info={}, metrics=metrics, steps=None,
               summary={"status": "finished"})


def drawn(fig, panel=0):
    return {line.get_label().split(" (n=")[0]: mcolors.to_hex(line.get_color()) for line in fig.axes[panel].lines}


def test_a_method_keeps_its_colour_when_another_has_nothing_to_draw():
    runs = {"SGD": [fake([np.nan] * 3)], "SAM": [fake([0.0, 0.1, -0.1])], "SAM+AACE": [fake([0.6, 0.6, 0.7])]}
    fig = plots.curves(runs, ["perturbation_cosine", "test_acc"], ncols=2)
    cosine, accuracy = drawn(fig, 0), drawn(fig, 1)
    assert "SGD" not in cosine  # nothing to draw: skipped, not shifting the others
    for name in ("SAM", "SAM+AACE"):
        assert cosine[name] == accuracy[name] == mcolors.to_hex(plots.PALETTE[name])
    assert accuracy["SGD"] == mcolors.to_hex(plots.PALETTE["SGD"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["SGD", "SAM", "SAM+AACE"] or sorted(legend) == ["SAM", "SAM+AACE", "SGD"]
    empty = {"SAM": [], **{k: v for k, v in runs.items() if k != "SAM"}}  # an empty series, too
    assert drawn(plots.curves(empty, ["perturbation_cosine"]), 0)["SAM+AACE"] == cosine["SAM+AACE"]


def test_other_names_get_distinct_colours_that_stay_theirs():
    first = plots.color_for("SAM+AACE rho 0.05")
    second = plots.color_for("SAM+AACE rho 0.1")
    assert first != second and first not in plots.PALETTE.values()
    assert plots.color_for("SAM+AACE rho 0.05") == first


def test_paired_differences_against_the_baseline():
    def run(acc, seed):
        r = fake([0.0, 0.0, 0.0], seed)
        r.metrics["test_acc"] = [0.1, 0.2, acc]
        return r
    runs = {0.0: {"SAM": [run(0.70, 0), run(0.72, 1)], "SAM+AACE": [run(0.75, 0), run(0.73, 1)]},
            0.4: {"SAM": [run(0.50, 0), run(0.52, 1)], "SAM+AACE": [run(0.49, 0), run(0.51, 1)]}}
    fig = plots.differences(runs, "SAM", "test_acc", "noise", "difference")
    series = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}
    assert list(series) == ["SAM+AACE (n=2 seeds)"]  # the baseline itself is not drawn
    line = series["SAM+AACE (n=2 seeds)"]
    assert np.allclose(line.get_ydata(), [3.0, -1.0])  # paired by seed, in points
    assert mcolors.to_hex(line.get_color()) == mcolors.to_hex(plots.PALETTE["SAM+AACE"])


def test_tuning_curves_label_the_grid_plainly_and_circle_the_chosen_rho():
    frame = pd.DataFrame([{"arm": arm, "rho": rho, "seed": seed, "val_acc": 0.8 + rho / 10, "train_acc": 1 - rho}
                          for arm in ("SAM", "SAM+AACE") for rho in (0.02, 0.05, 0.2, 0.5) for seed in (0, 1)])
    fig = plots.tuning(frame, {"SAM": 0.5, "SAM+AACE": 0.02})
    for ax in fig.axes[:2]:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0.02", "0.05", "0.2", "0.5"]
        assert [line.get_color() for line in ax.get_lines()] == [plots.color_for("SAM"), plots.color_for("SAM+AACE")]
    circled = [c for c in fig.axes[0].collections if c.get_sizes()[0] == 160]
    assert np.allclose([c.get_offsets()[0] for c in circled], [(0.5, 85.0), (0.02, 80.2)])
    matplotlib.pyplot.close(fig)


def test_every_figure_draws_each_arm_in_its_colour():
    """The figures the pages draw, with the reference studies' arm names: each arm in PALETTE's colour."""
    names = list(plots.PALETTE)
    runs = {name: [fake([0.1, 0.2, 0.3], seed=s) for s in range(3)] for name in names}
    for fig, panel in ((plots.curves(runs, ["test_acc"], ncols=1), 0),
                       (plots.paired_curves(runs, "SAM", "test_acc"), 0)):
        for line in fig.axes[panel].lines:
            label = line.get_label()
            name = label.split(" − ")[0].split(" (n=")[0]
            if name in plots.PALETTE:
                assert mcolors.to_hex(line.get_color()) == mcolors.to_hex(plots.PALETTE[name]), label
    frame = pd.DataFrame([{"arm": n, "rho": r, "field": "rho", "seed": 0, "val_acc": 0.5, "train_acc": 0.6}
                          for n in names[2:5] for r in (0.05, 0.1)])
    fig = plots.tuning(frame, {})
    drawn_ = {line.get_label(): line for line in fig.axes[0].lines}
    for line in fig.axes[0].lines:
        assert mcolors.to_hex(line.get_color()) in {mcolors.to_hex(plots.PALETTE[n]) for n in names[2:5]}
    assert len(drawn_) == 3 and len(set(plots.PALETTE.values())) == len(plots.PALETTE)  # one colour per arm
    assert len(set(plots.MARKERS.values())) == len(plots.MARKERS) and set(plots.MARKERS) == set(plots.PALETTE)
