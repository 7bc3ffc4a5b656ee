"""Speed and memory, as ratios measured side by side in one process: ``python -m benchmarks``.

Each comparison interleaves its contenders repeat by repeat, so that machine noise hits both alike, and
reports the median ratio with its interquartile range. Results go to benchmarks/results.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from aace import SAM, __version__ as aace_version, aace_loss, build_model, frozen_bn_stats
from aace.batches import BatchLoader
from aace.data import DATASETS, ArrayData

HERE = Path(__file__).resolve().parent


def timed(fn, sync) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(contenders: dict, repeats: int, warmup: int, sync) -> dict:
    """Median seconds per call of each contender, repeats interleaved."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn, sync))
    return times


def ratio(times: dict, num: str, den: str) -> dict:
    ratios = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[2],
            f"{num}_s": statistics.median(times[num]), f"{den}_s": statistics.median(times[den])}


class LoopSAM(torch.optim.Optimizer):
    """The common per-parameter-loop SAM (as in davda54/sam), for comparison only."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"]
                                            if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()


def make_step(model, x, y, method, optimizer_cls=SAM):
    # The training engine's settings (foreach SGD); the loop SAM keeps the base optimizer's defaults.
    kwargs = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, **({} if optimizer_cls is LoopSAM else {"foreach": True}))
    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), **kwargs)

        def step():
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step, opt
    extra = {} if optimizer_cls is LoopSAM else dict(normalize=method == "sam", ascent=method == "sam")
    opt = optimizer_cls(model.parameters(), torch.optim.SGD, rho=0.05, **extra, **kwargs)
    loss = torch.nn.functional.cross_entropy if method == "sam" else aace_loss

    def step():
        loss(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_bn_stats(model):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return step, opt


def bench_step_ratios(device, repeats, sync):
    out = {}
    for name, channels, size in (("wrn-10-1", 1, 28), ("wrn-16-4", 1, 28)):
        torch.manual_seed(0)
        x = torch.randn(128, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,), device=device)
        steps = {}
        for method in ("sgd", "sam", "aace"):
            model = build_model(name, 10, channels).to(device).to(memory_format=torch.channels_last).train()
            steps[method] = make_step(model, x, y, method)[0]
        reps = repeats if name == "wrn-10-1" else max(3, repeats // 3)
        times = interleaved(steps, reps, 2, sync)
        out[name] = {"sam_over_sgd": ratio(times, "sam", "sgd"), "aace_over_sgd": ratio(times, "aace", "sgd")}
    return out


def bench_optimizer(device, repeats, sync):
    torch.manual_seed(0)
    name = "pyramidnet-110-48"
    x = torch.randn(32, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=device)
    models = {k: build_model(name, 10, 3).to(device).to(memory_format=torch.channels_last) for k in ("ours", "loop")}
    full = {"ours": make_step(models["ours"], x, y, "sam", SAM)[0],
            "loop": make_step(models["loop"], x, y, "sam", LoopSAM)[0]}
    whole = interleaved(full, max(3, repeats // 3), 1, sync)
    # optimizer only: gradients fixed, first_step + second_step
    opts = {}
    for key, cls in (("ours", SAM), ("loop", LoopSAM)):
        model = models[key]
        opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.0, momentum=0.9,
                  **({} if cls is LoopSAM else {"foreach": True}))
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]

        def only(model=model, opt=opt, grads=grads):
            opt.first_step()
            for p, g in zip(model.parameters(), grads):
                p.grad = g
            opt.second_step()
        opts[key] = only
    optimizer_only = interleaved(opts, repeats * 3, 3, sync)
    return {"model": name, "tensors": len(list(models["ours"].parameters())),
            "step_ours_over_loop": ratio(whole, "ours", "loop"),
            "optimizer_loop_over_ours": ratio(optimizer_only, "loop", "ours")}


def bench_loss(device, repeats, sync):
    torch.manual_seed(0)
    logits = torch.randn(256, 100, device=device, requires_grad=True)
    y = torch.randint(0, 100, (256,), device=device)

    def run(fn):
        def call():
            for _ in range(20):
                fn(logits, y).backward()
        return call
    unchecked = lambda z, t: aace_loss(z, t, check_labels=False)  # noqa: E731 - as the training loop calls it
    times = interleaved({"aace": run(unchecked), "aace_checked": run(aace_loss),
                         "ce": run(torch.nn.functional.cross_entropy)}, repeats * 2, 3, sync)
    return {"aace_over_ce": ratio(times, "aace", "ce"), "aace_checked_over_ce": ratio(times, "aace_checked", "ce")}


def bench_data(repeats, sam_step_seconds):
    """Batched in-memory augmentation against torchvision per-sample transforms in a 2-worker DataLoader."""
    import torchvision.transforms.v2 as T
    n = 4096
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    spec = DATASETS["cifar10"]
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    ours = BatchLoader(ArrayData(images, labels), spec, mean, std, 128, train=True, augment="paper")
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(mean.tolist(), std.tolist()), T.RandomErasing(p=0.5, scale=(0.25, 0.25),
                                                                                      ratio=(1, 1), value=0)])

    class PerSample(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return transform(images[i]), labels[i]
    loader = torch.utils.data.DataLoader(PerSample(), batch_size=128, shuffle=True, num_workers=2,
                                         persistent_workers=True)
    epoch = iter(range(10 ** 6))

    def batched():
        for _ in ours.epoch(next(epoch)):
            pass

    def per_sample():
        for _ in loader:
            pass
    times = interleaved({"batched": batched, "per_sample": per_sample}, max(3, repeats // 3), 1, lambda: None)
    r = ratio(times, "per_sample", "batched")
    per_batch = statistics.median(times["batched"]) / len(ours)
    return {"images": n, "speedup_batched_over_per_sample": r,
            "batched_images_per_s": n / statistics.median(times["batched"]),
            "per_sample_images_per_s": n / statistics.median(times["per_sample"]),
            "data_share_of_sam_step": per_batch / sam_step_seconds}


def bench_memory():
    """Peak resident memory of short cpu-profile runs (subprocesses), and SAM's persistent state per parameter."""
    code = ("import resource,sys,tempfile;from aace.config import profile_config;from aace.train import run;"
            "run(profile_config('cpu',method=sys.argv[1],epochs=2),tempfile.mkdtemp(),progress=False);"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak = {m: int(subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True, check=True)
                   .stdout.split()[-1]) for m in ("sgd", "aace")}
    model = build_model("wrn-10-1", 10, 1)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state = {}
    for track in (False, True):
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, track_cosine=track)
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        for _ in range(2):
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        held = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        if opt._previous_perturbation is not None:
            held += sum(t.numel() * t.element_size() for t in opt._previous_perturbation[0])
        state["with_cosine" if track else "without_cosine"] = held / param_bytes
    return {"peak_rss_kib": peak, "peak_rss_aace_over_sgd": peak["aace"] / peak["sgd"],
            "sam_state_copies_of_parameters": state}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    results = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_threads": torch.get_num_threads(), "device": str(device),
                           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                           "torch": torch.__version__, "aace": aace_version},
               "goals": {"sam_over_sgd": "<= 2.05", "optimizer_loop_over_ours": ">= 3",
                         "step_ours_over_loop": "<= 1", "aace_over_ce": "<= 1.5",
                         "speedup_batched_over_per_sample": ">= 10", "data_share_of_sam_step": "< 0.05",
                         "sam_state_copies_of_parameters": "1 (+1 with the cosine tracking the book uses)"}}
    print("step ratios ...", flush=True)
    results["step"] = bench_step_ratios(device, args.repeats, sync)
    print("optimizer ...", flush=True)
    results["optimizer"] = bench_optimizer(device, args.repeats, sync)
    print("loss ...", flush=True)
    results["loss"] = bench_loss(device, args.repeats, sync)
    print("data ...", flush=True)
    results["data"] = bench_data(args.repeats, results["step"]["wrn-10-1"]["sam_over_sgd"]["sam_s"])
    if device.type == "cpu":
        print("memory ...", flush=True)
        results["memory"] = bench_memory()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    rows = [("SAM / SGD step, wrn-10-1", results["step"]["wrn-10-1"]["sam_over_sgd"]["median"], "<= 2.05"),
            ("SAM+AACE / SGD step, wrn-10-1", results["step"]["wrn-10-1"]["aace_over_sgd"]["median"], "<= 2.05"),
            ("SAM / SGD step, wrn-16-4", results["step"]["wrn-16-4"]["sam_over_sgd"]["median"], "<= 2.05"),
            ("SAM+AACE / SGD step, wrn-16-4", results["step"]["wrn-16-4"]["aace_over_sgd"]["median"], "<= 2.05"),
            ("our step / loop-SAM step, pyramidnet-110", results["optimizer"]["step_ours_over_loop"]["median"], "<= 1"),
            ("loop-SAM / our optimizer-only time", results["optimizer"]["optimizer_loop_over_ours"]["median"], ">= 3"),
            ("aace_loss / cross_entropy fwd+bwd", results["loss"]["aace_over_ce"]["median"], "<= 1.5"),
            ("batched / per-sample augmentation, images/s", results["data"]["speedup_batched_over_per_sample"]["median"], ">= 10"),
            ("data time / SAM step time", results["data"]["data_share_of_sam_step"], "< 0.05")]
    if "memory" in results:
        rows.append(("peak RSS, SAM+AACE / SGD run", results["memory"]["peak_rss_aace_over_sgd"], "-"))
    print(f"\n{'measure':<46} {'ratio':>8}  goal")
    for name, value, goal in rows:
        print(f"{name:<46} {value:>8.3f}  {goal}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
