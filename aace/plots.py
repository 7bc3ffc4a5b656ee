"""Figures for the book: curves per epoch or per step, one line per arm (mean over seeds, min-max band)."""
from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

LABELS = {
    "ce_loss": "CE loss (unperturbed w)", "aace_loss": "AACE loss (unperturbed w)",
    "grad_norm": "‖g‖ of the perturbation loss", "perturbation_norm": "‖e‖ (perturbation length)",
    "perturbation_cosine": "cos(e_t, e_t-1)", "test_acc": "test accuracy (%)", "train_acc": "training accuracy (%)",
    "val_acc": "validation accuracy (%)",
    "train_loss": "update loss at w + e", "test_loss": "test loss", "lr": "learning rate",
}


# One colour per method in every figure of the book, keyed by the method's name (never by its position in
# a figure, which shifts when a method has nothing to draw in a panel). Other names take the next free colour
# the first time they are drawn and keep it.
PERCENT = ("train_acc", "test_acc", "val_acc")
PALETTE = {"SGD": "tab:gray", "SGD, tuned label smoothing": "tab:brown", "SAM": "tab:blue", "SAM+AACE": "tab:orange",
           "SAM+AACE, normalised step": "tab:green", "SAM at normalised AACE's rho": "#1b4f72",
           "SAM+AACE normalised at SAM's rho": "#145a32", "SAM, weighted CE in the perturbation": "tab:purple",
           "SAM, weighted CE in the update": "tab:pink"}
MARKERS = {"SGD": "s", "SGD, tuned label smoothing": "D", "SAM": "o", "SAM+AACE": "^", "SAM+AACE, normalised step": "v",
           "SAM at normalised AACE's rho": "P", "SAM+AACE normalised at SAM's rho": "X",
           "SAM, weighted CE in the perturbation": "<", "SAM, weighted CE in the update": ">"}
_SPARE = [c for c in ["tab:red", "tab:olive", "tab:cyan", "#7d6608", "#6c3483", "#b03a2e",
                      "#117864", "#d35400", "#5d6d7e"] if c not in PALETTE.values()]
_assigned: dict = {}


def method_of(name: str) -> str | None:
    """The method a figure's name is ('SAM', 'SAM (n=5 seeds)' -> 'SAM'); None for another name, such as a variant
    ('SAM+AACE rho 0.05'), which takes a colour of its own so that variants in one figure stay apart."""
    base = name.split(" (n=")[0]
    return base if base in PALETTE else None


def marker_for(name: str) -> str:
    return MARKERS.get(method_of(name), "o")


def color_for(name: str) -> str:
    """The colour of a method (an arm's name, with any ' (n=...)' suffix left out)."""
    if method_of(name) is not None:
        return PALETTE[method_of(name)]
    if name not in _assigned:
        used = set(_assigned.values())
        free = [c for c in _SPARE if c not in used] or _SPARE
        _assigned[name] = free[0] if len(used) < len(_SPARE) else _SPARE[len(_assigned) % len(_SPARE)]
    return _assigned[name]


def _legend(fig, handles: dict) -> None:
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4), frameon=False,
               bbox_to_anchor=(0.5, -0.02))


def curves(runs_by_name: dict, columns: list[str], x: str = "epoch", table: str = "metrics", ncols: int = 3,
           log: tuple = (), title: str | None = None, smooth: int = 1):
    """One panel per column; for each name, the mean over its runs with a min-max band."""
    nrows = -(-len(columns) // ncols)
    height = 3.1 * nrows + 0.6  # the legend's own strip below the panels, clear of their x labels
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, height), squeeze=False)
    handles = {}  # every method drawn in any panel, for one legend
    for ax, column in zip(axes.flat, columns):
        for name, runs in runs_by_name.items():
            frames = [getattr(r, table) for r in runs if len(getattr(r, table))]
            if not frames or all(f[column].isna().all() for f in frames):  # e.g. SGD has no perturbation
                continue
            length = min(len(f) for f in frames)
            values = np.stack([f[column].to_numpy(dtype=float)[:length] for f in frames])
            if column in PERCENT:
                values = 100 * values  # accuracies in %, as in the tables
            if smooth > 1:
                kernel = np.ones(smooth) / smooth
                values = np.stack([np.convolve(v, kernel, mode="valid") for v in values])
            xs = frames[0][x].to_numpy()[:length][-values.shape[1]:]
            scored = ~np.isnan(values).all(axis=0)  # epochs a run did not evaluate (eval_every) are left out
            xs, values = xs[scored], values[:, scored]
            mean = np.nanmean(values, axis=0)
            label = f"{name}" + (f" (n={len(frames)})" if len(frames) > 1 else "")
            line, = ax.plot(xs, mean, label=label, color=color_for(name))
            handles.setdefault(label, line)
            if len(frames) > 1:
                ax.fill_between(xs, np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.2)
        ax.set_title(LABELS.get(column, column), fontsize=10)
        ax.set_xlabel(x)
        if column in log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    _legend(fig, handles)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.6 / height, 1, 1))
    return fig


def paired_curves(runs_by_name: dict, baseline: str, column: str = "test_acc", scale: float = 100.0):
    """Per epoch, each arm's paired difference from ``baseline`` (same seed), mean with its 95 % interval: the
    view for a question about tenths of a point, which raw accuracy bands over seeds hide."""
    from .stats import spread
    fig, ax = plt.subplots(figsize=(8.4, 3.6))
    base = {r.config.seed: r for r in runs_by_name[baseline]}
    for name, runs in runs_by_name.items():
        if name == baseline:
            continue
        pairs = [(r.metrics, base[r.config.seed].metrics) for r in runs if r.config.seed in base]
        if not pairs:
            continue
        length = min(min(len(a), len(b)) for a, b in pairs)
        diffs = np.stack([scale * (a[column].to_numpy(dtype=float)[:length] - b[column].to_numpy(dtype=float)[:length])
                          for a, b in pairs])
        xs = pairs[0][0]["epoch"].to_numpy()[:length]
        scored = ~np.isnan(diffs).all(axis=0)
        xs, diffs = xs[scored], diffs[:, scored]
        stats_ = [spread(col[~np.isnan(col)]) for col in diffs.T]
        mean = np.array([s["mean"] for s in stats_])
        half = np.array([s["ci95"] if s["n"] > 1 else 0.0 for s in stats_])
        ax.plot(xs, mean, color=color_for(name), marker=marker_for(name), markersize=4,
                label=f"{name} − {baseline} (n={len(pairs)} seeds)")
        ax.fill_between(xs, mean - half, mean + half, color=color_for(name), alpha=0.15)
    ax.axhline(0.0, color="k", lw=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"paired difference in {LABELS.get(column, column).replace(' (%)', '')} (points)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
    fig.tight_layout()
    return fig


def histograms(values_by_name: dict, xlabel: str, bins: int = 30, log: bool = True):
    fig, ax = plt.subplots(figsize=(6, 3.4))
    all_values = np.concatenate([np.asarray(v, dtype=float) for v in values_by_name.values()])
    edges = np.geomspace(max(all_values.min(), 1e-8), all_values.max(), bins) if log else bins
    for name, values in values_by_name.items():
        ax.hist(values, bins=edges, alpha=0.5, label=name, color=color_for(name))
    if log:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on a log axis
    ax.set_xlabel(xlabel)
    ax.set_ylabel("steps")
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def versus(runs_by_x: dict, column: str, xlabel: str, ylabel: str | None = None, scale: float = 1.0):
    """A metric's last-epoch value against a setting, one line per arm.

    ``runs_by_x``: {x: {arm name: [runs]}}. Markers at the mean over runs, bars from min to max.
    """
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = sorted(runs_by_x)
    names = list(dict.fromkeys(name for x in xs for name in runs_by_x[x]))
    width = 0.012 * (max(xs) - min(xs) or 1)  # spread the arms sideways so their bars do not overlap
    for i, name in enumerate(names):
        points = [(x, [scale * float(r.metrics[column].iloc[-1]) for r in runs_by_x[x].get(name, []) if r.finished])
                  for x in xs]
        points = [(x, v) for x, v in points if v]
        if not points:
            continue
        at = np.array([x for x, _ in points]) + (i - (len(names) - 1) / 2) * width
        mean = np.array([np.mean(v) for _, v in points])
        low = mean - np.array([np.min(v) for _, v in points])
        high = np.array([np.max(v) for _, v in points]) - mean
        n = max(len(v) for _, v in points)
        ax.errorbar(at, mean, yerr=[low, high], marker="o", capsize=3, label=name + (f" (n={n})" if n > 1 else ""),
                    color=color_for(name))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or LABELS.get(column, column))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def differences(runs_by_x: dict, baseline: str, column: str, xlabel: str, ylabel: str, scale: float = 100.0):
    """Each arm minus ``baseline``, paired by seed, against a setting: the mean difference with its 95 %
    interval (none with one seed), one line per arm; zero marked. ``runs_by_x``: {x: {arm name: [runs]}}."""
    from .experiments import paired_difference
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = sorted(runs_by_x)
    names = [n for n in dict.fromkeys(n for x in xs for n in runs_by_x[x]) if n != baseline]
    width = 0.012 * (max(xs) - min(xs) or 1)
    for i, name in enumerate(names):
        points = [(x, paired_difference(runs_by_x[x][baseline], runs_by_x[x][name], column)) for x in xs
                  if name in runs_by_x[x] and baseline in runs_by_x[x]]
        points = [(x, d) for x, d in points if d["n"]]
        if not points:
            continue
        at = np.array([x for x, _ in points]) + (i - (len(names) - 1) / 2) * width
        mean = np.array([scale * d["mean"] for _, d in points])
        ci = np.array([scale * d["ci95"] if d["n"] > 1 else 0.0 for _, d in points])
        n = max(d["n"] for _, d in points)
        ax.errorbar(at, mean, yerr=ci, marker="o", capsize=3, color=color_for(name),
                    label=f"{name} (n={n} seed{'s' if n > 1 else ''})")
    ax.axhline(0.0, color="k", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def tuning(frame, chosen: dict):
    """The tuning curves: final validation and training accuracy against each arm's tuned value, one line per arm
    (mean over the tuning seeds, each seed a dot), the chosen value circled; one row of panels per tuned field
    (rho; label smoothing), each on its own axis. ``frame``: ``Comparison.tuning_frame()``; ``chosen``: {arm
    name: value}."""
    fields = list(dict.fromkeys(frame["field"])) if "field" in frame else ["rho"]
    fig, axes = plt.subplots(len(fields), 2, figsize=(9.6, 3.3 * len(fields) + 0.4), squeeze=False)
    handles = {}
    for row, field in zip(axes, fields):
        part_field = frame[frame["field"] == field] if "field" in frame else frame
        for ax, column in zip(row, ("val_acc", "train_acc")):
            for name, part in part_field.groupby("arm", sort=False):
                mean = 100 * part.groupby("rho")[column].mean()
                line, = ax.plot(mean.index, mean.to_numpy(), marker=marker_for(name), color=color_for(name))
                ax.scatter(part["rho"], 100 * part[column], s=10, color=color_for(name), alpha=0.5)
                if name in chosen:
                    ax.scatter([chosen[name]], [mean[chosen[name]]], s=160, facecolors="none",
                               edgecolors=color_for(name), linewidths=2)
                handles.setdefault(name, line)
            ax.set_xscale("log")
            values = sorted(part_field["rho"].unique())  # the grid's values as plain numbers, no minor labels
            ax.set_xticks(values, [f"{v:g}" for v in values], fontsize=8)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(field.replace("_", " "))
            ax.set_title(LABELS[column].replace("(%)", "(%), final epoch"), fontsize=10)
            ax.grid(alpha=0.3)
    _legend(fig, handles)
    fig.tight_layout(rect=(0, 0.1 / len(fields), 1, 1))
    return fig


def paired_effects(values_by_name: dict, margin: float | None = None, unit: str = "points"):
    """Per comparison, each seed's paired difference (grey dots, spread a little vertically so that ties show),
    their mean with its 95 % interval (black), zero, and the band of +-``margin`` within which a difference counts
    as equivalent. ``values_by_name``: {comparison: values}, or {group title: {comparison: values}} for one panel
    per group (each testbed on its own scale)."""
    from .stats import spread
    groups = values_by_name if values_by_name and isinstance(next(iter(values_by_name.values())), dict) \
        else {None: values_by_name}
    jitter = np.random.default_rng(0)  # a fixed spread: the same figure on every build
    heights = [0.6 + 0.6 * len(g) for g in groups.values()]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9.0, 0.9 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (title, group) in zip(axes[:, 0], groups.items()):
        for i, (name, values) in enumerate(group.items()):
            s = spread(values)
            ax.scatter(values, i + jitter.uniform(-0.18, 0.18, len(values)), color="0.55", s=12, zorder=3, alpha=0.8)
            if s["n"] > 1:
                ax.errorbar([s["mean"]], [i], xerr=[[s["ci95"]], [s["ci95"]]], fmt="o", color="k", capsize=5,
                            zorder=4)
        ax.axvline(0.0, color="k", lw=1)
        if margin:
            ax.axvspan(-margin, margin, color="tab:green", alpha=0.12, label=f"within ±{margin:g} {unit}: equivalent")
        ax.set_yticks(range(len(group)), list(group))
        ax.set_ylim(len(group) - 0.5, -0.6)
        ax.grid(alpha=0.3, axis="x")
        if title:
            ax.set_title(title, fontsize=10, loc="left")
    axes[-1, 0].set_xlabel(f"paired difference in final test accuracy ({unit}): dots, one per seed; black, mean and "
                           f"95 % interval" + (f"; green, ±{margin:g} {unit}" if margin else ""))
    fig.tight_layout()
    return fig


def replication(rows: list[tuple[str, float, float, float]], unit: str = "points"):
    """Per replicated comparison (label, this build's effect, the reference's prediction interval lo, hi): the
    interval as a bar, the build's value as a dot, green inside and red outside."""
    fig, ax = plt.subplots(figsize=(9.0, 1.6 + 0.5 * len(rows)))
    for i, (label, value, lo, hi) in enumerate(rows):
        ax.plot([lo, hi], [i, i], color="0.6", lw=6, solid_capstyle="butt", zorder=2)
        inside = lo <= value <= hi
        ax.scatter([value], [i], color="tab:green" if inside else "tab:red", s=30, zorder=3)
    ax.axvline(0.0, color="k", lw=1)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.8)
    ax.set_xlabel(f"paired effect ({unit}); bar: the reference's prediction interval for this many seeds; dot: this build")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def build_times(minutes: dict, trained: dict):
    """Minutes per page of the last build (bars), each labelled with the runs it trained."""
    fig, ax = plt.subplots(figsize=(7.0, 1.0 + 0.3 * len(minutes)))
    names = list(minutes)
    ax.barh(range(len(names)), [minutes[n] for n in names], color="tab:blue", alpha=0.7)
    for i, n in enumerate(names):
        ax.text(minutes[n], i, f"  {trained.get(n, 0)} trained", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("minutes to execute the page")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig


def by_class(frame, column: str, ylabel: str, reference: str | None = None):
    """Per class, ordered by its training images (log scale, head on the left): each arm's mean of ``column`` over
    its seeds, with the mean's 95 % interval as a band (the seeds' min-max hid the means under each other's bands).
    ``frame``: one row per arm, seed and class with 'arm', 'class', 'training images' and ``column``
    (aace.evidence.class_frame); ``reference``: a column drawn as a dashed line (the same for every arm), such as
    each class's share of the training images."""
    from .stats import spread
    fig, ax = plt.subplots(figsize=(8.0, 4.2))
    for arm, rows in frame.groupby("arm", sort=False):
        per = rows.groupby("training images", sort=True)[column]
        x, mean = np.array(per.mean().index, dtype=float), per.mean().to_numpy()
        ax.plot(x, mean, marker=marker_for(arm), color=color_for(arm), label=arm)
        half = np.array([spread(v.to_numpy())["ci95"] for _, v in per])
        ax.fill_between(x, mean - half, mean + half, color=color_for(arm), alpha=0.15, lw=0)
    if reference is not None:
        ref = frame.groupby("training images", sort=True)[reference].first()
        ax.plot(ref.index, ref.to_numpy(), "k--", lw=1, label=reference)
    counts = sorted(frame["training images"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(counts))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(int(c)) for c in counts]))
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.invert_xaxis()
    ax.set_xlabel("training images of the class (head on the left, tail on the right)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig
