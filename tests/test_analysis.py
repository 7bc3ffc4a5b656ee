"""Analysis functions on problems whose answers are known in closed form."""
import math

import numpy as np
import pytest
import torch

from aace import analysis


def quadratic(eigenvalues, seed=0):
    """0.5 w^T A w with A = Q diag(eigenvalues) Q^T; returns (loss_fn, w, A)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    w = torch.randn(len(eigenvalues), generator=g, dtype=torch.float64, requires_grad=True)
    return (lambda: 0.5 * w @ a @ w), w, a


def test_hessian_top_eigenvalue_of_a_quadratic():
    loss_fn, w, _ = quadratic([5.0, 2.0, 1.0, -0.5, 0.1])
    assert analysis.hessian_top_eigenvalue(loss_fn, [w], iters=200, tol=1e-10) == pytest.approx(5.0, rel=1e-6)


def test_hessian_top_eigenvalue_over_several_tensors():
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, -1.0], dtype=torch.float64, requires_grad=True)
    # loss = 3 a^2 + 0.5 b0^2 + 2 b1^2 + a b0: Hessian [[6, 1, 0], [1, 1, 0], [0, 0, 4]]
    loss_fn = lambda: 3 * a ** 2 + 0.5 * b[0] ** 2 + 2 * b[1] ** 2 + a * b[0]  # noqa: E731
    expected = float(torch.linalg.eigvalsh(torch.tensor([[6.0, 1, 0], [1, 1, 0], [0, 0, 4]], dtype=torch.float64)).max())
    assert analysis.hessian_top_eigenvalue(loss_fn, [a, b], iters=300, tol=1e-12) == pytest.approx(expected, rel=1e-6)


def test_worst_case_loss_of_a_linear_function_is_exact():
    c = torch.tensor([3.0, -4.0], dtype=torch.float64)
    w = torch.tensor([1.0, 1.0], dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()
    got = analysis.worst_case_loss(lambda: c @ w, [w], rho=0.5, steps=5)
    assert got == pytest.approx(float(c @ before) + 0.5 * 5.0, rel=1e-6)
    assert torch.equal(w.detach(), before)  # weights restored


def test_worst_case_loss_of_a_quadratic_along_its_top_direction():
    a = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    w = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    got = analysis.worst_case_loss(lambda: 0.5 * w @ a @ w, [w], rho=0.3, steps=10)
    assert got == pytest.approx(0.5 * 4.0 * 1.3 ** 2, rel=1e-6)


def test_filter_normalized_direction_matches_filter_norms():
    conv = torch.nn.Conv2d(3, 4, 3)
    params = [conv.weight, conv.bias]
    d_weight, d_bias = analysis.filter_normalized_direction(params, seed=1)
    torch.testing.assert_close(d_weight.reshape(4, -1).norm(dim=1), conv.weight.detach().reshape(4, -1).norm(dim=1))
    assert torch.count_nonzero(d_bias) == 0


def test_loss_landscape_of_a_quadratic_is_the_parabola():
    loss_fn, w, a = quadratic([2.0, 1.0])
    w2 = w.detach()[None].clone().requires_grad_()  # one 2-D "filter" so the direction is rescaled to ||w||
    loss2 = lambda: 0.5 * w2[0] @ a @ w2[0]  # noqa: E731
    alphas = np.linspace(-1, 1, 5)
    got = analysis.loss_landscape(loss2, [w2], alphas, seed=3)
    d = analysis.filter_normalized_direction([w2], seed=3)[0][0]
    expected = [float((0.5 * (w2[0] + t * d) @ a @ (w2[0] + t * d)).detach()) for t in alphas]
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    grid = analysis.loss_landscape(loss2, [w2], alphas, betas=np.linspace(-1, 1, 3), seed=3)
    assert grid.shape == (5, 3)
    np.testing.assert_allclose(grid[:, 1], expected, rtol=1e-10)  # beta = 0 column


def test_minibatch_full_cosine():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    same = analysis.minibatch_full_cosine(model, torch.nn.functional.cross_entropy, x, y, batch_size=64)
    assert same == [pytest.approx(1.0, abs=1e-6)]
    cos = analysis.minibatch_full_cosine(model, torch.nn.functional.cross_entropy, x, y, batch_size=16)
    assert len(cos) == 4 and all(-1 <= c <= 1 for c in cos) and min(cos) < 0.999


def test_fraction_below_and_loss_curves():
    assert analysis.fraction_below([0.1, 0.2, 0.3, 0.4], 0.25) == 0.5
    table = analysis.loss_vs_true_probability([0.5, 0.9], 10)
    assert table.aace_loss.tolist() == pytest.approx([math.log(2), -math.log(0.1)])


def test_spread_interval():
    from aace import experiments as ex
    s = ex.spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == 1.0 and s["ci95"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)


def fake_run(test_acc, seed=0, status="finished"):
    import pandas as pd

    from aace.config import RunConfig
    from aace.store import Run
    metrics = pd.DataFrame({"epoch": range(1, len(test_acc) + 1), "test_acc": test_acc})
    return Run(path=None, config=RunConfig(seed=seed), info={}, metrics=metrics, steps=None,
               summary={"status": status})


def test_a_table_finding_gives_the_mde_at_the_holm_level_of_its_datasets():
    from aace import experiments as ex, stats
    sam = [fake_run([0.80 + 0.01 * s], seed=s) for s in range(4)]
    aace = [fake_run([0.80 + 0.01 * s + (0.002, -0.003, 0.004, 0.001)[s]], seed=s) for s in range(4)]
    d = ex.paired_difference(sam, aace, ex.FINAL_TEST)
    one = ex.table_finding({"a": {"SAM": sam, "SAM+AACE": aace}})
    two = ex.table_finding({"a": {"SAM": sam, "SAM+AACE": aace}, "b": {"SAM": sam, "SAM+AACE": aace}})
    assert f"minimum detectable effect {100 * stats.minimum_detectable_effect(d):.1f} points" in one
    assert f"minimum detectable effect {100 * stats.minimum_detectable_effect(d, 0.025):.1f} points" in two
    assert "Holm-corrected over 2 datasets" in two


def test_drop_from_peak_leaves_out_diverged_runs():
    from aace import experiments as ex
    s = ex.drop_from_peak([fake_run([0.5, 0.8, 0.7]), fake_run([0.6, 0.6]), fake_run([0.9, 0.1], status="diverged")])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.05)


def test_versus_plots_means_with_min_max_bars():
    import matplotlib
    matplotlib.use("Agg")
    from aace import plots
    runs = {0.0: {"A": [fake_run([0.1, 0.8]), fake_run([0.1, 0.6])], "B": [fake_run([0.5])]},
            0.4: {"A": [fake_run([0.2, 0.5]), fake_run([0.2, 0.3])], "B": [fake_run([0.5, 0.2])]}}
    fig = plots.versus(runs, "test_acc", "noise", scale=100)
    a, b = fig.axes[0].containers
    np.testing.assert_allclose(a.lines[0].get_ydata(), [70, 40])
    np.testing.assert_allclose(b.lines[0].get_ydata(), [50, 20])
    # the two arms sit on either side of each level; A's bars span its lowest to its highest run
    assert (a.lines[0].get_xdata() < [0.0, 0.4]).all() and (b.lines[0].get_xdata() > [0.0, 0.4]).all()
    segments = a.lines[2][0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segments], [[60, 80], [30, 50]])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["A (n=2)", "B"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(noise_levels=[0.2, 1.0]), "'noise_levels'"), (dict(noise_levels=[]), "'noise_levels'"),
    (dict(arms=["sam", "mixup"]), "'arms'"), (dict(profile="laptop"), "'profile'"),
    (dict(seeds=[-1]), "'seeds'")])
def test_label_noise_runs_names_the_bad_parameter(kwargs, message):
    from aace import experiments as ex
    call = {"profile": "smoke", "noise_levels": [0.2], "arms": ["sam"], **kwargs}
    with pytest.raises(ValueError, match=message):
        ex.label_noise_runs(**call)


def test_label_noise_runs_trains_each_level_and_arm(tmp_path):
    from aace import experiments as ex
    runs = ex.label_noise_runs("smoke", [0.0, 0.4], ["sam", "taylor_ce_update"], seeds=[3],
                               overrides={"epochs": 1, "train_subset": 64, "test_subset": 64}, runs_dir=tmp_path)
    assert list(runs) == [0.0, 0.4] and list(runs[0.4]) == ["SAM", "SAM, Taylor-CE update"]
    taylor = runs[0.4]["SAM, Taylor-CE update"][0].config
    assert (taylor.label_noise, taylor.update_loss, taylor.seed, taylor.epochs) == (0.4, "taylor_ce", 3, 1)
    assert runs[0.0]["SAM"][0].config.label_noise == 0.0 and runs[0.0]["SAM"][0].finished


def test_quarter_ratio_of_a_growing_metric():
    from aace import experiments as ex
    run_ = fake_run([1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0])  # quarters of 2 epochs: means 1 and 4
    assert ex.quarter_ratio(run_, "test_acc") == 4.0
