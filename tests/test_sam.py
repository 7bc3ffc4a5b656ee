import copy
import io

import pytest
import torch
from torch import nn

from aace import SAM, aace_loss, frozen_bn_stats


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def hand_step(model, x, y, rho, normalize, ascent, adaptive, lr=0.1, eps=1e-12):
    """One SAM step written out parameter by parameter, plain SGD base, no momentum."""
    params = list(model.parameters())
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    t = [p.detach().abs() if adaptive else torch.ones_like(p) for p in params]
    norm = torch.sqrt(sum(((ti * g) ** 2).sum() for ti, g in zip(t, grads)))
    sign = 1.0 if ascent else -1.0
    es = []
    for p, g, ti in zip(params, grads, t):
        e = sign * rho * ti * ti * g
        es.append(e / (norm + eps) if normalize else e)
    with torch.no_grad():
        for p, e in zip(params, es):
            p.add_(e)
    grads2 = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params)
    with torch.no_grad():
        for p, e, g2 in zip(params, es, grads2):
            p.sub_(e)
            p.sub_(lr * g2)
    return norm, torch.sqrt(sum((e ** 2).sum() for e in es))


def sam_step(model, opt, x, y):
    nn.functional.cross_entropy(model(x), y).backward()
    norms = opt.first_step(zero_grad=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return norms


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("ascent", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_hand_written_step(normalize, ascent, adaptive):
    x, y = data()
    ours, ref = tiny_model(), tiny_model()
    opt = SAM(ours.parameters(), torch.optim.SGD, rho=0.3, normalize=normalize, ascent=ascent,
              adaptive=adaptive, lr=0.1)
    grad_norm, e_norm = sam_step(ours, opt, x, y)
    ref_grad_norm, ref_e_norm = hand_step(ref, x, y, 0.3, normalize, ascent, adaptive)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_norm, ref_grad_norm, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(e_norm, ref_e_norm, rtol=1e-5, atol=1e-7)
    if normalize and not adaptive:
        torch.testing.assert_close(e_norm, torch.tensor(0.3), rtol=1e-5, atol=0)


def test_step_with_closure_equals_two_calls():
    x, y = data()
    a, b = tiny_model(), tiny_model()
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for _ in range(3):
        sam_step(a, opt_a, x, y)
        nn.functional.cross_entropy(b(x), y).backward()

        def closure():
            loss = nn.functional.cross_entropy(b(x), y)
            loss.backward()
            return loss
        opt_b.step(closure)
        opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_weights_restored_exactly_before_base_step():
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.7, lr=0.0)  # lr 0: the step itself changes nothing
    before = [p.detach().clone() for p in model.parameters()]
    sam_step(model, opt, x, y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_aace_perturbation_descends_on_ce():
    """The paper's step, w - rho * grad AACE, moves up CE (AACE's gradient points against CE's)."""
    x, y = data()
    model = tiny_model()
    model.eval()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, normalize=False, ascent=False, lr=0.1)
    ce_before = nn.functional.cross_entropy(model(x), y).item()
    aace_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert nn.functional.cross_entropy(model(x), y).item() > ce_before


def test_frozen_parameters_untouched():
    x, y = data()
    model = tiny_model()
    frozen = model[0].weight
    frozen.requires_grad_(False)
    before = frozen.detach().clone()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    sam_step(model, opt, x, y)
    assert torch.equal(frozen, before)
    assert not torch.equal(model[3].weight, tiny_model()[3].weight)


def test_per_group_rho():
    x, y = data()
    model = tiny_model()
    opt = SAM([{"params": model[0].parameters(), "rho": 0.0}, {"params": model[3].parameters()}],
              torch.optim.SGD, rho=0.5, lr=0.0)
    first = [p.detach().clone() for p in model[0].parameters()]
    last = [p.detach().clone() for p in model[3].parameters()]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model[0].parameters(), first))
    assert not any(torch.equal(p, q) for p, q in zip(model[3].parameters(), last))


@pytest.mark.parametrize("rho", [-0.1, float("nan"), "0.1"])
def test_bad_rho_rejected(rho):
    with pytest.raises(ValueError, match="rho"):
        SAM(tiny_model().parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": tiny_model().parameters(), "rho": rho}], torch.optim.SGD, lr=0.1)


def test_bad_base_optimizer_and_order_rejected():
    with pytest.raises(ValueError, match="base_optimizer"):
        SAM(tiny_model().parameters(), torch.optim.SGD(tiny_model().parameters(), lr=0.1), rho=0.1)
    opt = SAM(tiny_model().parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        opt.second_step()


def test_state_dict_round_trip_resumes_bit_for_bit():
    x, y = data()
    uninterrupted = tiny_model()
    opt = SAM(uninterrupted.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(6):
        sam_step(uninterrupted, opt, x, y)

    first = tiny_model()
    opt1 = SAM(first.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        sam_step(first, opt1, x, y)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert any("momentum_buffer" in s for s in saved["opt"]["base"]["state"].values())

    resumed = tiny_model(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = SAM(resumed.parameters(), torch.optim.SGD, rho=0.9, lr=0.5, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["rho"] == 0.05 and opt2.param_groups[0]["lr"] == 0.1
    for _ in range(3):
        sam_step(resumed, opt2, x, y)
    for p, q in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_perturbation_cosine():
    x, y = data()
    model = tiny_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.0, track_cosine=True)
    sam_step(model, opt, x, y)
    assert torch.isnan(opt.perturbation_cosine)
    sam_step(model, opt, x, y)  # lr 0 and frozen BN would repeat e; BN in train mode keeps it equal too
    torch.testing.assert_close(opt.perturbation_cosine, torch.tensor(1.0), rtol=0, atol=1e-5)
    x2, y2 = data(seed=5)
    params = list(model.parameters())
    nn.functional.cross_entropy(model(x2), y2).backward()
    g = [p.grad.clone() for p in params]
    prev = torch.cat([e.flatten() for e in opt._previous_perturbation[0]])
    opt.first_step(zero_grad=True)
    expected = torch.nn.functional.cosine_similarity(torch.cat([t.flatten() for t in g]), prev, dim=0)
    torch.testing.assert_close(opt.perturbation_cosine, expected, rtol=1e-4, atol=1e-5)


def test_frozen_bn_stats_leaves_running_statistics_exactly():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2),
                          nn.BatchNorm1d(2, momentum=None))
    model.train()
    model(torch.randn(5, 3, 8, 8))
    buffers = copy.deepcopy({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k})
    with frozen_bn_stats(model):
        out_frozen = model(torch.randn(5, 3, 8, 8) * 4 + 2)
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    # still normalised with batch statistics in training mode: per-channel mean ~0 after the BN layer
    x = torch.randn(5, 3, 8, 8) * 4 + 2
    with frozen_bn_stats(model):
        h = model[1](model[0](x))
    torch.testing.assert_close(h.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    model(x)  # outside: statistics move again
    assert not torch.equal(model.state_dict()["1.running_mean"], buffers["1.running_mean"])
    assert out_frozen.shape == (5, 2)


def test_a_closure_that_raises_leaves_the_weights_at_w_and_the_next_step_works():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()

    def closure():
        raise RuntimeError("out of memory in the second pass")
    with pytest.raises(RuntimeError, match="second pass"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y).backward())  # no "first_step called twice"


@pytest.mark.parametrize("rho", [float("inf"), float("nan"), -0.1, True, "0.1"])
def test_every_way_into_a_param_group_checks_rho(rho):
    opt = SAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        opt.add_param_group({"params": torch.nn.Linear(2, 2).parameters(), "rho": rho})
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        SAM([{"params": torch.nn.Linear(2, 2).parameters(), "rho": rho}], torch.optim.SGD, lr=0.1)
    assert len(opt.param_groups) == 1 == len(opt.base_optimizer.param_groups)
