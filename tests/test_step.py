"""``aace.sam_step``, the public SAM step, against hand-written steps: plain, accumulated, clipped, scheduled."""
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from aace import SAM, aace_loss, frozen_bn_stats, sam_step

CE = nn.functional.cross_entropy


def net(bn=True, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)] if bn else \
        [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def aace_sam(model, **kwargs):
    return SAM(model.parameters(), torch.optim.SGD, rho=0.2, normalize=False, ascent=False, lr=0.1, momentum=0.9,
               **kwargs)


def by_hand(model, opt, x, y, clip=None):
    aace_loss(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with frozen_bn_stats(model):
        CE(model(x), y).backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.second_step(zero_grad=True)


def test_sam_step_is_the_hand_written_step_bit_for_bit():
    a, b = net(), net()
    opt_a, opt_b = aace_sam(a), aace_sam(b)
    for seed in range(3):
        x, y = batch(seed=seed)
        result = sam_step(a, opt_a, x, y, aace_loss, CE)
        by_hand(b, opt_b, x, y)
        assert not result.skipped and result.logits.shape == (32, 4)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_accumulating_four_micro_batches_equals_one_batch_of_their_size():
    a, b = net(bn=False), net(bn=False)
    opt_a, opt_b = aace_sam(a), aace_sam(b)
    for seed in range(3):
        x, y = batch(128, seed)
        one = sam_step(a, opt_a, x, y, aace_loss, CE, accumulate=4)
        big = sam_step(b, opt_b, x, y, aace_loss, CE)
        assert one.perturbation_norm.item() == pytest.approx(big.perturbation_norm.item(), rel=1e-5)
        assert one.loss.item() == pytest.approx(big.loss.item(), rel=1e-5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_clips_the_update_and_leaves_the_aace_perturbation_as_defined():
    a, b, c = net(), net(), net()
    opt_a, opt_b, opt_c = aace_sam(a), aace_sam(b), aace_sam(c)
    x, y = batch()
    clipped = sam_step(a, opt_a, x, y, aace_loss, CE, clip_grad_norm=0.05)
    plain = sam_step(c, opt_c, x, y, aace_loss, CE)
    assert torch.equal(clipped.perturbation_norm, plain.perturbation_norm)  # the step length AACE defines
    by_hand(b, opt_b, x, y, clip=0.05)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6),
    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)])
def test_schedulers_drive_sam_as_they_drive_sgd_without_a_warning(make):
    model = net()
    opt = aace_sam(model)
    reference = torch.optim.SGD(net().parameters(), lr=0.1, momentum=0.9)
    ours, theirs = make(opt), make(reference)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would fail here
        for seed in range(5):
            x, y = batch(seed=seed)
            sam_step(model, opt, x, y, aace_loss, CE)
            ours.step()
            reference.step()
            theirs.step()
            lrs.append((opt.param_groups[0]["lr"], reference.param_groups[0]["lr"]))
    assert all(a == b for a, b in lrs) and len({a for a, _ in lrs}) > 1


def test_step_without_first_step_or_closure_says_what_to_do():
    model = net()
    opt = aace_sam(model)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.step()


def test_closure_form_still_matches():
    a, b = net(), net()
    opt_a, opt_b = aace_sam(a), aace_sam(b)
    x, y = batch()
    aace_loss(a(x), y).backward()

    def closure():
        with frozen_bn_stats(a):
            loss = CE(a(x), y)
        loss.backward()
        return loss
    opt_a.step(closure)
    opt_a.zero_grad()
    by_hand(b, opt_b, x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("kwargs,words", [({"accumulate": 0}, "accumulate"), ({"accumulate": 64}, "accumulate"),
                                          ({"clip_grad_norm": -1.0}, "clip_grad_norm")])
def test_bad_arguments_are_named(kwargs, words):
    model = net()
    with pytest.raises(ValueError, match=words):
        sam_step(model, aace_sam(model), *batch(), aace_loss, CE, **kwargs)
    with pytest.raises(ValueError, match="aace.SAM"):
        sam_step(model, torch.optim.SGD(model.parameters(), lr=0.1), *batch(), aace_loss, CE)


def test_lightning_manual_optimisation_example_trains():
    lightning = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is an optional dependency")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    from lightning_sam import SAMModule
    x, y = batch(256)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = SAMModule(net(), rho=0.2)
    trainer = lightning.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    before = CE(module.model.eval()(x), y).item()
    module.model.train()
    trainer.fit(module, data)
    assert CE(module.model.eval()(x), y).item() < before
