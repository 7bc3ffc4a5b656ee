"""Cost of the paper's runs: seconds per training step of the authors' models at their batch sizes.

``python -m benchmarks.paper_scale [--device cuda] [--steps 10]`` writes benchmarks/paper_scale.json, which
the book's GPU page reads to state the expected wall time of a 200-epoch CIFAR run.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from aace.config import profile_config

from .__main__ import make_step

HERE = Path(__file__).resolve().parent
CIFAR_TRAIN_IMAGES = 50_000


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.paper_scale", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(HERE / "paper_scale.json"))
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite paper_scale.md from the measured paper_scale.json (no measurement)")
    args = parser.parse_args(argv)
    if args.markdown_only:
        results = json.loads(Path(args.out).read_text())
        Path(args.out).with_suffix(".md").write_text(to_markdown(results))
        return
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    from aace import build_model
    rows = []
    paper = profile_config("paper")
    for model_name, batch in ((paper.model, paper.batch_size), ("pyramidnet-272-200", 64)):
        for method in ("sgd", "sam", "aace"):
            torch.manual_seed(0)
            model = build_model(model_name, 100, 3, paper.model_variant).to(device)
            model = model.to(memory_format=torch.channels_last).train()
            x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 100, (batch,), device=device)
            step = make_step(model, x, y, method)[0]
            for _ in range(3):
                step()
            times = []
            for _ in range(args.steps):
                sync()
                start = time.perf_counter()
                step()
                sync()
                times.append(time.perf_counter() - start)
            seconds = statistics.median(times)
            steps_per_epoch = -(-CIFAR_TRAIN_IMAGES // batch)
            rows.append({"model": f"{model_name} ({paper.model_variant})", "batch_size": batch, "method": method,
                         "seconds_per_step": seconds, "minutes_per_epoch": seconds * steps_per_epoch / 60,
                         "hours_per_200_epochs": seconds * steps_per_epoch * 200 / 3600})
            print(rows[-1], flush=True)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    info = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "platform": platform.platform(), "torch": torch.__version__, "dtype": "float32",
            "note": "training steps only, data on the device, CIFAR-100 shapes (32x32x3, 100 classes)"}
    results = {"machine": info, "rows": rows}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(to_markdown(results))


def to_markdown(results: dict) -> str:
    """The table the book's GPU page includes."""
    m = results["machine"]
    lines = [f"Measured by `python -m benchmarks.paper_scale` on {m['gpu'] or m['device']} (torch {m['torch']}, "
             f"{m['dtype']}; {m['note']}):", "",
             "| model | batch | method | s / step | min / epoch | h / 200 epochs |", "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['method']} | {r['seconds_per_step']:.3f} | "
                     f"{r['minutes_per_epoch']:.2f} | {r['hours_per_200_epochs']:.1f} |")
    lines += ["", "What the `paper` study (`aace.study.PLANS[\"paper\"]`) costs at these step times, training steps "
              "only (evaluation adds a little):", "", "| model | tuning runs | final runs | GPU-hours |", "|---|---|---|---|"]
    for model, (tuning, final, hours) in study_cost(results).items():
        lines.append(f"| {model} | {tuning} | {final} | {hours:.0f} |")
    return "\n".join(lines) + "\n"


def study_cost(results: dict, plan_name: str = "paper") -> dict:
    """{model: (tuning runs, final runs, GPU-hours)} of a study plan at the measured seconds per step: each run's
    steps (its training images, the validation split held out, over its batch size, times its epochs) times its
    method's step time (normalised AACE costs what AACE costs)."""
    from aace.study import PLANS, final_configs, tuning_configs
    plan = PLANS[plan_name]
    chosen = {key: values[0] for key, values in plan.rhos.items()}  # the cost does not depend on rho
    out = {}
    for row_model in dict.fromkeys(r["model"] for r in results["rows"]):
        name = row_model.split(" ")[0]
        rows = {r["method"]: r for r in results["rows"] if r["model"] == row_model}
        batch = next(iter(rows.values()))["batch_size"]
        overrides = {"model": name, "batch_size": batch}
        tuning, final = tuning_configs(plan, **overrides), final_configs(plan, chosen, **overrides)
        hours = 0.0
        for config in tuning + final:
            images = CIFAR_TRAIN_IMAGES - (config.val_subset or 0)
            steps = -(-images // config.batch_size) * config.epochs
            hours += rows[config.method]["seconds_per_step"] * steps / 3600
        out[row_model] = (len(tuning), len(final), hours)
    return out


if __name__ == "__main__":
    main()
