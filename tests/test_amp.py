"""Mixed precision: fp16 loss scaling around SAM's two passes, with the whole step skipped on overflow."""
import contextlib

import pytest
import torch
from torch import nn

from aace import SAM, aace_loss
from aace.config import profile_config
from aace import sam_step
from aace.train import run


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    return model, opt, torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)


CE = nn.functional.cross_entropy


def state(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [s["momentum_buffer"].clone() for s in opt.base_optimizer.state.values() if "momentum_buffer" in s])


def test_scaled_step_without_overflow_equals_the_plain_step():
    a, opt_a, x, y = setup()
    b, opt_b, _, _ = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for _ in range(3):
        skipped = sam_step(a, opt_a, x, y, aace_loss, CE, autocast=contextlib.nullcontext(), scaler=scaler).skipped
        assert not skipped
        sam_step(b, opt_b, x, y, aace_loss, CE, autocast=contextlib.nullcontext(), scaler=None)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # the scale is a power of two: scaling and unscaling are exact


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_overflow_in_either_pass_skips_the_whole_step(bad_pass):
    model, opt, x, y = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    sam_step(model, opt, x, y, aace_loss, CE, autocast=contextlib.nullcontext(), scaler=scaler)  # momentum exists now
    before = state(model, opt)
    scale = scaler.get_scale()
    calls = {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == bad_pass else grad
    handle = model[0].weight.register_hook(poison)
    skipped = sam_step(model, opt, x, y, aace_loss, CE, autocast=contextlib.nullcontext(), scaler=scaler).skipped
    handle.remove()
    assert skipped
    after = state(model, opt)
    assert all(torch.equal(p, q) for p, q in zip(before[0], after[0]))  # weights back to w, no step
    assert all(torch.equal(p, q) for p, q in zip(before[1], after[1]))  # momentum untouched
    assert scaler.get_scale() == scale * 0.5
    assert opt._perturbed is None  # ready for the next step
    skipped = sam_step(model, opt, x, y, aace_loss, CE, autocast=contextlib.nullcontext(), scaler=scaler).skipped
    assert not skipped


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_on_the_cpu(tmp_path, precision):
    # 10 images: fp16 convolutions' backward on the CPU is a slow reference kernel (16 s for a step of 64)
    result = run(profile_config("smoke", method="aace", precision=precision, epochs=1, train_subset=10,
                                batch_size=10, test_subset=32), tmp_path, progress=False)
    assert result.finished and result.metrics["train_loss"].notna().all()
    assert "skipped" in result.steps
