import math

import pytest
import torch
import torch.nn.functional as F

from aace import AACELoss, aace_loss, aace_target, cross_entropy


def loop_target(logits, target, mode, threshold, target_norm, weights=None):
    """Independent, per-sample, per-class construction of the AACE target (the paper's definition)."""
    p = torch.softmax(logits.double(), dim=1)
    t = torch.zeros_like(p)
    for i in range(p.shape[0]):
        y = int(target[i])
        a = [0.0] * p.shape[1]
        for j in range(p.shape[1]):
            if j == y:
                continue
            a[j] = float(p[i, j]) if mode == "ada" else 1.0 if mode == "const" else float(weights[i, j])
        total = sum(a)
        t_y = min(float(p[i, y]), threshold)
        for j in range(p.shape[1]):
            if j != y:
                t[i, j] = a[j] / total * ((1 - t_y) if target_norm == "normalized" else 1.0)
        t[i, y] = t_y
    return t


def loop_loss(logits, t):
    logp = torch.log_softmax(logits.double(), dim=1)
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            if t[i, j] > 0:
                out[i] += t[i, j] * (math.log(t[i, j]) - logp[i, j])
    return out


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 5, generator=g) * 3, torch.tensor([0, 1, 2, 3, 4, 2])


def test_closed_form_ada_threshold_zero(batch):
    logits, y = batch
    p_y = torch.softmax(logits.double(), 1)[torch.arange(6), y]
    expected = -torch.log1p(-p_y)
    torch.testing.assert_close(aace_loss(logits, y, reduction="none").double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["ada", "const"])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
@pytest.mark.parametrize("target_norm", ["authors", "normalized"])
def test_against_loop_implementation(batch, mode, threshold, target_norm):
    logits, y = batch
    t = loop_target(logits, y, mode, threshold, target_norm)
    torch.testing.assert_close(aace_target(logits, y, mode, threshold, target_norm).double(), t,
                               rtol=1e-5, atol=1e-7)
    got = aace_loss(logits, y, mode, threshold, reduction="none", target_norm=target_norm).double()
    torch.testing.assert_close(got, loop_loss(logits, t), rtol=1e-5, atol=1e-6)


def test_rand_mode_draws_float64_weights_as_the_authors_do(batch):
    # The authors draw the random weights with torch.rand in the default dtype (float32) and cast them: float64
    # logits must see the same weights, or float64 parity with their loss is lost.
    logits, y = batch
    z = logits.double()
    weights = (1.0 - torch.rand(z.shape, generator=torch.Generator().manual_seed(7))).to(torch.float64)
    expected = loop_target(z, y, "rand", 0.0, "authors", weights)
    got = aace_target(z, y, "rand", generator=torch.Generator().manual_seed(7))
    assert got.dtype == torch.float64 and torch.allclose(got, expected.to(got.dtype), rtol=0, atol=1e-12)
    loss = aace_loss(z, y, "rand", threshold=0.3, reduction="none", generator=torch.Generator().manual_seed(7))
    assert loss.dtype == torch.float64 and torch.isfinite(loss).all()


def test_rand_mode_against_loop_with_same_draw(batch):
    logits, y = batch
    weights = 1.0 - torch.rand(logits.shape, generator=torch.Generator().manual_seed(7))
    t = loop_target(logits, y, "rand", 0.0, "authors", weights)
    got_t = aace_target(logits, y, "rand", generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(got_t, t, rtol=1e-5, atol=1e-7)
    got = aace_loss(logits, y, "rand", reduction="none", generator=torch.Generator().manual_seed(7)).double()
    torch.testing.assert_close(got, loop_loss(logits, t), rtol=1e-5, atol=1e-6)
    # redrawn on every call
    assert not torch.equal(aace_target(logits, y, "rand"), aace_target(logits, y, "rand"))


def test_authors_target_sums_to_one_plus_t_y(batch):
    logits, y = batch
    t = aace_target(logits, y, "ada", 0.3, "authors")
    p_y = torch.softmax(logits, 1)[torch.arange(6), y]
    torch.testing.assert_close(t.sum(1), 1 + p_y.clamp(max=0.3))
    torch.testing.assert_close(aace_target(logits, y, "ada", 0.3, "normalized").sum(1), torch.ones(6))


@pytest.mark.parametrize("mode,threshold", [("ada", 0.0), ("ada", 0.2), ("const", 0.0), ("const", 0.2)])
def test_gradient_is_p_minus_t(batch, mode, threshold):
    logits, y = batch
    z = logits.clone().double().requires_grad_()
    aace_loss(z, y, mode, threshold, reduction="sum", target_norm="normalized").backward()
    t = aace_target(logits, y, mode, threshold, "normalized").double()
    torch.testing.assert_close(z.grad, torch.softmax(z.detach(), 1) - t, rtol=1e-4, atol=1e-6)


def test_gradient_identity_with_cross_entropy(batch):
    logits, y = batch
    z1 = logits.clone().double().requires_grad_()
    z2 = logits.clone().double().requires_grad_()
    aace_loss(z1, y, reduction="sum").backward()
    F.cross_entropy(z2, y, reduction="sum").backward()
    p_y = torch.softmax(logits.double(), 1)[torch.arange(6), y][:, None]
    torch.testing.assert_close(z1.grad, -(p_y / (1 - p_y)) * z2.grad, rtol=1e-4, atol=1e-7)


def _true_class_logits(p_y, classes=10):
    # logit m on the true class, 0 elsewhere: p_y = e^m / (e^m + C - 1)
    m = math.log(p_y * (classes - 1) / (1 - p_y))
    z = torch.zeros(1, classes, dtype=torch.float64)
    z[0, 0] = m
    return z


def test_loss_and_gradient_grow_near_convergence_while_ce_vanishes():
    rows = []
    for p_y in [0.58, 0.93, 0.998, 0.99999]:
        za = _true_class_logits(p_y).requires_grad_()
        zc = _true_class_logits(p_y).requires_grad_()
        la, lc = aace_loss(za, torch.tensor([0])), F.cross_entropy(zc, torch.tensor([0]))
        la.backward()
        lc.backward()
        rows.append((la.item(), za.grad.norm().item(), lc.item(), zc.grad.norm().item()))
        torch.testing.assert_close(la.item(), -math.log(1 - p_y), rtol=1e-6, atol=0)
    for a, b in zip(rows, rows[1:]):
        assert b[0] > a[0] and b[1] > a[1]   # AACE loss and gradient norm grow
        assert b[2] < a[2] and b[3] < a[3]   # CE loss and gradient norm vanish
    assert math.sqrt(10 / 9) - 1e-3 <= rows[-1][1] <= math.sqrt(2)
    assert rows[-1][3] < 1e-4


@pytest.mark.parametrize("margin", [1e4, -1e4])
@pytest.mark.parametrize("mode,threshold", [("ada", 0.0), ("ada", 0.3), ("rand", 0.0), ("const", 0.1)])
def test_finite_for_huge_margins_float32(margin, mode, threshold):
    z = torch.zeros(4, 10)
    z[:, 3] = margin
    z.requires_grad_()
    loss = aace_loss(z, torch.full((4,), 3), mode, threshold)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_finite_under_bfloat16_autocast():
    layer = torch.nn.Linear(8, 10)
    with torch.no_grad():
        layer.bias[3] = 1e4
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = aace_loss(logits, torch.full((4,), 3))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_reductions_and_module(batch):
    logits, y = batch
    per = aace_loss(logits, y, reduction="none")
    torch.testing.assert_close(aace_loss(logits, y, reduction="sum"), per.sum())
    torch.testing.assert_close(aace_loss(logits, y), per.mean())
    torch.testing.assert_close(AACELoss(reduction="none")(logits, y), per)


def test_cross_entropy_uses_label_smoothing(batch):
    logits, y = batch
    torch.testing.assert_close(cross_entropy(logits, y, 0.1), F.cross_entropy(logits, y, label_smoothing=0.1))
    logp = torch.log_softmax(logits, 1)
    manual = -(0.9 * logp[torch.arange(6), y] + 0.1 * logp.mean(1)).mean()
    torch.testing.assert_close(cross_entropy(logits, y, 0.1), manual)


@pytest.mark.parametrize("call,message", [
    (lambda z, y: aace_loss(z, y, mode="adaptive"), "mode"),
    (lambda z, y: aace_loss(z, y, reduction="avg"), "reduction"),
    (lambda z, y: aace_loss(z, y, threshold=1.5, mode="const"), "threshold"),
    (lambda z, y: aace_loss(z, torch.tensor([0, 1, 2, 3, 4, 5])), "label 5"),
    (lambda z, y: aace_loss(z, torch.tensor([0, -1, 2, 3, 4, 0])), "label -1"),
    (lambda z, y: aace_loss(z, y[:3]), "shape"),
    (lambda z, y: aace_loss(z[0], y), "shape"),
    (lambda z, y: aace_loss(z, y.float()), "integer"),
    (lambda z, y: cross_entropy(z, y, label_smoothing=1.0), "label_smoothing"),
])
def test_bad_inputs_raise_clear_errors(batch, call, message):
    logits, y = batch
    with pytest.raises(ValueError, match=message):
        call(logits, y)


# ----------------------------------------------------------------------------- related losses

from aace import LOSSES, dual_focal_loss, focal_loss, taylor_cross_entropy  # noqa: E402


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_closed_form_and_autograd(batch, gamma):
    logits, y = batch
    p_y = torch.softmax(logits.double(), 1)[torch.arange(6), y]
    expected = -((1 - p_y) ** gamma) * torch.log(p_y)
    torch.testing.assert_close(focal_loss(logits, y, gamma, reduction="none").double(), expected, rtol=1e-5, atol=1e-6)
    z = logits.double().requires_grad_()
    focal_loss(z, y, gamma, reduction="sum").backward()
    z2 = logits.double().requires_grad_()
    p = torch.softmax(z2, 1)[torch.arange(6), y]
    (-((1 - p) ** gamma) * torch.log(p)).sum().backward()
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-5, atol=1e-7)
    if gamma == 0:
        torch.testing.assert_close(focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))


def _dual_focal_by_hand(logits, y, gamma):
    """Tao et al.'s definition, written per sample: p_j is the largest probability below p_y, or 0."""
    p = torch.softmax(logits.double(), 1)
    rows = []
    for i in range(len(y)):
        p_y = p[i, y[i]]
        below = [p[i, k] for k in range(p.shape[1]) if p[i, k] < p_y]
        p_j = max(below) if below else torch.zeros((), dtype=p.dtype)
        rows.append(-((1 - p_y + p_j) ** gamma) * torch.log(p_y))
    return torch.stack(rows)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 5.0])
def test_dual_focal_loss_closed_form_and_autograd(batch, gamma):
    logits, y = batch
    torch.testing.assert_close(dual_focal_loss(logits, y, gamma, reduction="none").double(),
                               _dual_focal_by_hand(logits, y, gamma), rtol=1e-5, atol=1e-6)
    z = logits.double().requires_grad_()
    dual_focal_loss(z, y, gamma, reduction="sum").backward()
    z2 = logits.double().requires_grad_()
    _dual_focal_by_hand(z2, y, gamma).sum().backward()
    torch.testing.assert_close(z.grad.float(), z2.grad.float(), rtol=1e-4, atol=1e-6)
    if gamma == 0:
        torch.testing.assert_close(dual_focal_loss(logits, y, 0.0), F.cross_entropy(logits, y))


def test_dual_focal_loss_weighs_by_the_runner_up():
    y = torch.tensor([0, 0, 0])
    # p_y the largest (p_j = the second largest), p_y in the middle, p_y the smallest (p_j = 0, focal loss).
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 1.0, -1.0], [-3.0, 1.0, 0.0]])
    p = torch.softmax(logits.double(), 1)
    weights = torch.stack([1 - p[0, 0] + p[0, 1], 1 - p[1, 0] + p[1, 2], 1 - p[2, 0]])
    torch.testing.assert_close(dual_focal_loss(logits, y, 1.0, reduction="none").double(),
                               -weights * torch.log(p[:, 0]), rtol=1e-6, atol=1e-7)
    # With p_y the smallest there is no runner-up below it: the dual focal loss is the focal loss.
    torch.testing.assert_close(dual_focal_loss(logits[2:], y[2:], 2.0), focal_loss(logits[2:], y[2:], 2.0))


@pytest.mark.parametrize("order", [1, 2, 6])
def test_taylor_cross_entropy_closed_form(batch, order):
    logits, y = batch
    q = 1 - torch.softmax(logits.double(), 1)[torch.arange(6), y]
    expected = sum(q ** k / k for k in range(1, order + 1))
    torch.testing.assert_close(taylor_cross_entropy(logits, y, order, reduction="none").double(), expected,
                               rtol=1e-5, atol=1e-6)


def test_taylor_cross_entropy_approaches_cross_entropy_and_stays_bounded():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([0])
    assert abs(taylor_cross_entropy(logits, y, 200) - F.cross_entropy(logits, y)) < 1e-6
    wrong = torch.tensor([[-50.0, 50.0, 0.0]])  # a confidently wrong sample (a noisy label): CE is 100
    assert taylor_cross_entropy(wrong, y, 2) <= 1.5 + 1e-6 and F.cross_entropy(wrong, y) > 99


@pytest.mark.parametrize("name, options", [(name, {}) for name in sorted(LOSSES)] + [
    ("focal", {"gamma": 0.5}), ("dual_focal", {"gamma": 0.5})])  # 0 < gamma < 1: an infinite derivative at 0
@pytest.mark.parametrize("margin", [1e4, -1e4])
def test_every_registered_loss_is_finite_for_huge_margins(name, options, margin):
    z = torch.zeros(4, 10)
    z[:, 3] = margin
    z.requires_grad_()
    loss = LOSSES[name](z, torch.full((4,), 3), reduction="mean", check_labels=True, **options)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("call,words", [
    (lambda: aace_loss(torch.zeros(2, 3), torch.tensor([0, 1]), threshold="0.3"), "threshold must be a number in [0, 1]"),
    (lambda: aace_loss(torch.zeros(2, 3), torch.tensor([0, 1]), threshold=float("nan")), "threshold must be a number"),
    (lambda: aace_target(torch.zeros(2, 3), torch.tensor([0, 1]), threshold=True), "threshold must be a number"),
    (lambda: aace_target([[1.0, 2.0]], [0]), "logits must be a torch.Tensor"),
    (lambda: aace_target(torch.zeros(1, 2), [0]), "target must be a torch.Tensor"),
])
def test_bad_arguments_are_refused_by_name_not_by_a_raw_type_error(call, words):
    with pytest.raises(ValueError) as err:
        call()
    assert words in str(err.value)


# ----------------------------------------------------------------------------- exponentially weighted cross-entropy

from aace.losses import class_weights, exponentially_weighted_cross_entropy  # noqa: E402


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.999, 0.9999])
def test_class_weights_closed_form(beta):
    counts = [500, 120, 30, 7, 1]
    raw = [(1 - beta) / (1 - beta ** n) if beta else 1.0 for n in counts]
    expected = torch.tensor(raw, dtype=torch.float64) / (sum(raw) / len(raw))
    torch.testing.assert_close(class_weights(counts, beta), expected, rtol=1e-10, atol=0)
    w = class_weights(counts, beta)
    assert beta == 0 or all(a < b for a, b in zip(w, w[1:]))  # fewer samples, more weight


def test_exponentially_weighted_cross_entropy_closed_form_and_autograd():
    torch.manual_seed(11)
    logits = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 1, 3])
    counts = [400, 100, 25, 6]
    w = class_weights(counts, 0.99)
    p = torch.softmax(logits.detach(), 1)
    expected = -(w[y] * torch.log(p[torch.arange(8), y]))
    torch.testing.assert_close(exponentially_weighted_cross_entropy(logits, y, counts, 0.99, reduction="none"),
                               expected)
    loss = exponentially_weighted_cross_entropy(logits, y, counts, 0.99)
    loss.backward()
    # d/dz of -w_y log softmax(z)_y, averaged over the batch: w_y (p - onehot(y)) / B
    hand = w[y][:, None] * (p - F.one_hot(y, 4).double()) / 8
    torch.testing.assert_close(logits.grad, hand)
    assert torch.autograd.gradcheck(lambda z: exponentially_weighted_cross_entropy(z, y, counts, 0.99),
                                    (logits.detach().clone().requires_grad_(),))


def test_exponentially_weighted_cross_entropy_is_cross_entropy_on_balanced_classes():
    torch.manual_seed(12)
    z, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    torch.testing.assert_close(exponentially_weighted_cross_entropy(z, y, [600] * 10), F.cross_entropy(z, y))
    torch.testing.assert_close(exponentially_weighted_cross_entropy(z, y), F.cross_entropy(z, y))


@pytest.mark.parametrize("call, words", [
    (lambda: class_weights([10, 0, 3]), "class_counts must be one count >= 1 per class"),
    (lambda: class_weights([10]), "at least 2 classes"),
    (lambda: class_weights([10, 3], beta=1.0), "beta must be a number in \\[0, 1\\)"),
    (lambda: exponentially_weighted_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), [5, 5]),
     "one count per class \\(3\\), got 2"),
])
def test_exponentially_weighted_cross_entropy_errors_name_the_argument(call, words):
    with pytest.raises(ValueError, match=words):
        call()
