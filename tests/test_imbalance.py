"""The long-tailed testbed's per-class record (aace.imbalance): accuracy by class and each class's share of the
perturbation, against hand computations and autograd."""
import math

import pytest
import torch

from aace import imbalance
from aace.batches import BatchLoader
from aace.data import ArrayData, spec
from aace.losses import aace_loss, cross_entropy


def _loader(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    data = ArrayData(images, labels)
    return BatchLoader(data, spec("fashion_mnist"), torch.tensor([0.3]), torch.tensor([0.35]), 16, train=False)


def _model(seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))


def test_class_accuracy_counts_each_class_on_its_own():
    loader, model = _loader(), _model()
    with torch.no_grad():
        predicted = model(loader._normalize(loader.images)).argmax(1)
    expected = [float((predicted[loader.labels == c] == c).double().mean()) for c in range(10)]
    assert imbalance.class_accuracy(model, loader, 10) == pytest.approx(expected, abs=0)
    assert math.isnan(imbalance.class_accuracy(model, loader, 11)[10])  # a class with no image


@pytest.mark.parametrize("loss_fn", [cross_entropy, aace_loss])
def test_perturbation_shares_are_each_classs_projection_on_the_whole_gradient(loss_fn):
    loader, model = _loader(), _model()
    shares = imbalance.perturbation_class_shares(model, loss_fn, loader, 10)
    x, y = loader._normalize(loader.images), loader.labels
    params = list(model.parameters())
    flat = lambda gs: torch.cat([g.flatten() for g in gs]).double()  # noqa: E731
    whole = flat(torch.autograd.grad(loss_fn(model(x), y), params))  # the mean over every training image
    for c in range(10):
        mask = y == c
        g_c = flat(torch.autograd.grad(loss_fn(model(x[mask]), y[mask]) * mask.sum() / len(y), params))
        # float32 gradients summed in another order: agreement to 1e-6 of the whole (shares are O(0.01-1))
        assert shares[c] == pytest.approx(float(g_c.dot(whole) / whole.dot(whole)), abs=1e-6)
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)


def test_a_long_tailed_run_records_both_by_class_and_a_damaged_record_is_named(tmp_path):
    from aace.config import profile_config
    from aace.tables import summary_problem
    from aace.train import run
    config = profile_config("smoke", method="aace", epochs=1, train_subset=250, imbalance_ratio=10.0)
    result = run(config, tmp_path, progress=False)
    s = result.summary
    assert len(s["test_accuracy_by_class"]) == 10 and len(s["perturbation_share_by_class"]) == 10
    assert sum(s["perturbation_share_by_class"]) == pytest.approx(1.0, abs=1e-6)
    assert summary_problem(s, result.metrics) is None
    assert "not a list of accuracies" in summary_problem({**s, "test_accuracy_by_class": [0.5, 2.0]}, result.metrics)
    balanced = run(profile_config("smoke", method="sgd", epochs=1), tmp_path, progress=False)
    assert "test_accuracy_by_class" not in balanced.summary  # the other testbeds' runs are as they were


class _Run:
    def __init__(self, key, seed, acc, by_class):
        from aace import plans
        self.config = plans.arm_config(plans.PLANS["cpu-imbalanced"], key, seed, None if key == "sgd" else 0.05)
        self.finished = True
        self.summary = {"full_test_acc": acc, "test_accuracy_by_class": by_class}
        import pandas as pd
        self.metrics = pd.DataFrame({"test_acc": [acc]})


def test_group_scorings_average_each_declared_class_group():
    from aace import verdicts
    by_class = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0]
    run_ = _Run("sam", 0, 0.45, by_class)
    assert verdicts.score(run_, "head") == pytest.approx(0.8)
    assert verdicts.score(run_, "medium") == pytest.approx(0.45)
    assert verdicts.score(run_, "tail") == pytest.approx(0.1)
    assert math.isnan(verdicts.score(_Run("sam", 0, 0.45, None), "tail"))  # a run of another testbed


def test_the_long_tailed_study_asks_its_declared_questions_and_no_other():
    from aace import plans, verdicts
    g = torch.Generator().manual_seed(5)
    finals = {}
    for k, key in enumerate(plans.PLANS["cpu-imbalanced"].final_arms):
        noise = torch.rand(12, generator=g).tolist()
        finals[key] = [_Run(key, s, 0.5 + 0.01 * k + 0.003 * noise[s], [0.5] * 10) for s in range(12)]
    table = verdicts.verdicts(finals)
    assert table["question"].unique().tolist() == ["positive control", "AACE", "weighted CE in SAM"]
    assert table[table["question"] == "AACE"]["comparison"].tolist() == ["SAM+AACE − SAM"]
    assert len(table[table["question"] == "weighted CE in SAM"]) == 3
    assert table.iloc[0]["verdict"].startswith("better")  # the positive control, SAM 1 point over SGD


def _group_finals(tail_effect, head_effect, control=0.05, n=12):
    """Finals of SGD, SAM and SAM+AACE whose head and tail class accuracies differ by the given effects (points
    scaled to accuracy), a seeded spread of 0.3 points; SAM beats SGD by ``control`` on every class."""
    g = torch.Generator().manual_seed(7)
    finals = {"sgd": [], "sam": [], "aace": []}
    for s in range(n):
        jitter = (0.003 * torch.randn(3, generator=g)).tolist()
        sgd = [0.6 + jitter[1]] * 10
        sam = [a + control + (jitter[2] if control else 0.0) for a in sgd]  # no control: SAM's runs are SGD's
        aace = [a + (head_effect if c in (0, 1, 2) else tail_effect if c in (7, 8, 9) else 0.0) + jitter[0]
                for c, a in enumerate(sam)]
        for key, by_class in (("sgd", sgd), ("sam", sam), ("aace", aace)):
            finals[key].append(_Run(key, s, sum(by_class) / 10, by_class))
    return finals


@pytest.mark.parametrize("tail, head, control, expected", [
    (-0.05, 0.0, 0.05, "supported"),       # the tail loses, the head does not move
    (-0.05, -0.05, 0.05, "not decided"),    # the head loses too: not the prediction's pattern
    (0.05, 0.0, 0.05, "contradicted"),      # the tail gains
    (0.0, 0.0, 0.05, "contradicted"),       # the tail does not move (equivalent)
    (-0.05, 0.0, 0.0, "not decided"),       # SAM does not beat SGD: the testbed cannot see SAM's effect
])
def test_the_prediction_is_read_by_its_declared_rule(tail, head, control, expected):
    from aace import verdicts
    finals = _group_finals(tail, head, control)
    assert verdicts.prediction_reading(verdicts.verdicts(finals, "head"), verdicts.verdicts(finals, "tail")) == expected



def test_the_finding_says_why_nothing_is_decided_and_names_the_largest_other_effect():
    from aace import evidence, plans, verdicts
    finals = _group_finals(-0.05, 0.0, control=0.0)   # SAM does not beat SGD
    finals["sam_ewce_update"] = [_Run("sam_ewce_update", r.config.seed, r.summary["full_test_acc"] + 0.02,
                                      [a - 0.02 if c < 3 else a + 0.1 if c > 6 else a
                                       for c, a in enumerate(r.summary["test_accuracy_by_class"])])
                                 for r in finals["sam"]]
    tables = {s: verdicts.verdicts(finals, s) for s in (verdicts.PRIMARY, *verdicts.GROUP_SCORINGS)}
    text = evidence.imbalance_finding(tables, verdicts.prediction_reading(tables["head"], tables["tail"]))
    assert text.startswith("**Finding.** The prediction that AACE starves SAM's tail classes is *not decided*")
    assert "SAM itself is not shown to beat SGD" in text
    assert verdicts.NO_CONTROL not in text   # said once, in words, not after every verdict
    assert "The largest other declared effect is SAM, weighted CE in the update − SAM: +2.00 points" in text
    assert "trading 2.00 points on the head classes for 10.00 on the tail" in text
    assert "does worse than SGD" not in text   # SAM − SGD is 0 here: not shown to beat it
    assert text.count("\n- ") == 4   # each sentence's verdicts with the interval its rule used
    decided = _group_finals(-0.05, 0.0)
    tables = {s: verdicts.verdicts(decided, s) for s in (verdicts.PRIMARY, *verdicts.GROUP_SCORINGS)}
    text = evidence.imbalance_finding(tables, "supported")
    assert "*supported*" in text and "SAM itself" not in text and "largest other" not in text

def test_the_class_frame_holds_each_run_s_classes_with_their_training_images():
    from aace import evidence
    finals = _group_finals(-0.05, 0.0)
    frame = evidence.class_frame({"SAM": finals["sam"]})
    counts = finals["sam"][0].config.class_counts()
    assert len(frame) == 12 * 10 and frame["training images"].tolist()[:10] == counts
    assert frame.groupby("seed")["share of the training images (%)"].sum().round(9).eq(100).all()
    assert frame["test accuracy (%)"].iloc[0] == pytest.approx(100 * finals["sam"][0].summary["test_accuracy_by_class"][0])


def test_the_imbalance_page_reads_the_smoke_study_and_draws_each_arm_in_its_colour():
    from matplotlib.colors import to_hex
    from aace import comparison, evidence, plots
    comp = comparison.testbed_comparison("imbalanced", "smoke")
    assert set(comp.by_key()) == {"sgd", "sam", "aace", "sam_ewce_ascent", "sam_ewce_update"}
    frame = evidence.class_frame(comp.runs)
    fig = plots.by_class(frame, "test accuracy (%)", "test accuracy (%)")
    lines = {line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert lines == {arm: to_hex(plots.color_for(arm)) for arm in comp.runs}
    assert set(comp.tuning_frame()["arm"]) == {"SAM", "SAM+AACE", "SAM, weighted CE in the perturbation",
                                               "SAM, weighted CE in the update"}
