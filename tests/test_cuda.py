"""The GPU path: bf16 and fp16 SAM steps, the whole-step skip on overflow, the training engine and its
determinism on CUDA. Skipped where no CUDA device exists (CI has none; run them where a GPU is)."""
import contextlib

import pytest
import torch
from torch import nn

from aace import SAM, aace_loss, build_model
from aace.config import profile_config
from aace import sam_step
from aace.train import run

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CE = nn.functional.cross_entropy


def small_wrn(seed=0):
    torch.manual_seed(seed)
    model = build_model("wrn-10-1", 10, 1).cuda().to(memory_format=torch.channels_last)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, normalize=False, ascent=False, lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 1, 28, 28, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    return model, opt, x, torch.randint(0, 10, (32,), generator=g).cuda()


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_step_stays_close_to_fp32(dtype):
    a, opt_a, x, y = small_wrn()
    b, opt_b, _, _ = small_wrn()
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    for _ in range(3):
        skipped = sam_step(a, opt_a, x, y, aace_loss, CE, autocast=torch.autocast("cuda", dtype=dtype), scaler=scaler).skipped
        assert not skipped
        sam_step(b, opt_b, x, y, aace_loss, CE, autocast=contextlib.nullcontext(), scaler=None)
    start = weights(small_wrn()[0])
    for p, q, w in zip(a.parameters(), b.parameters(), start):
        # the low-precision step moves the weights as fp32 does, to within a few % of the move
        assert torch.linalg.vector_norm(p - q) <= 0.05 * torch.linalg.vector_norm(q - w) + 1e-6


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_fp16_overflow_in_either_pass_skips_the_whole_step_on_cuda(bad_pass):
    model, opt, x, y = small_wrn()
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    autocast = torch.autocast("cuda", dtype=torch.float16)
    sam_step(model, opt, x, y, aace_loss, CE, autocast=autocast, scaler=scaler)  # momentum exists now
    before = weights(model)
    momentum = [s["momentum_buffer"].clone() for s in opt.base_optimizer.state.values()]
    scale, calls = scaler.get_scale(), {"n": 0}

    def poison(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == bad_pass else grad
    handle = next(model.parameters()).register_hook(poison)
    skipped = sam_step(model, opt, x, y, aace_loss, CE, autocast=autocast, scaler=scaler).skipped
    handle.remove()
    assert skipped and scaler.get_scale() == scale * 0.5
    assert all(torch.equal(p, q) for p, q in zip(before, weights(model)))
    assert all(torch.equal(m, s["momentum_buffer"]) for m, s in zip(momentum, opt.base_optimizer.state.values()))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_engine_trains_on_cuda_with_validation(tmp_path, precision):
    config = profile_config("smoke", method="aace", precision=precision, device="cuda", epochs=2,
                            train_subset=512, val_subset=200, test_subset=256)
    result = run(config, tmp_path, progress=False)
    assert result.finished, result.summary
    assert result.info["environment"]["gpu"] == torch.cuda.get_device_name()
    assert result.metrics[["train_loss", "val_acc", "test_acc"]].notna().all().all()
    assert result.metrics["train_acc"].iloc[-1] > 0.3  # it learns


def test_two_identical_cuda_runs_agree(tmp_path):
    """cuDNN may pick other kernels from run to run: identical runs agree closely, not always bit for bit."""
    config = profile_config("smoke", method="sam", device="cuda", epochs=2, train_subset=512, test_subset=256)
    a = run(config, tmp_path / "a", progress=False)
    b = run(config, tmp_path / "b", progress=False)
    for column in ("train_loss", "grad_norm", "test_loss"):
        assert a.metrics[column].to_numpy() == pytest.approx(b.metrics[column].to_numpy(), rel=1e-3)
