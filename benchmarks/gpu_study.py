"""How many runs should share one GPU? ``python -m benchmarks.gpu_study``.

For each model, the same short SAM run of the ``gpu`` profile trains once alone and then as k copies at
once (other seeds) through the study's worker pool; reported: each run's training images/second (from its
own epoch timing), their sum, the wall time of the batch and the GPU utilisation sampled meanwhile. The
ratio "k at once / alone" of summed images/second is what running the study in a pool gains.
Results go to benchmarks/results_gpu_study.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from aace import __version__
from aace.config import profile_config
from aace.study import GPUSampler, run_pool

HERE = Path(__file__).resolve().parent


def measure(model: str, k: int, epochs: int, runs_dir: str, offset: int) -> dict:
    configs = [profile_config("gpu", method="sam", model=model, epochs=epochs, seed=offset + i) for i in range(k)]
    start = time.time()
    with GPUSampler(interval=1.0) as sampler:
        runs, _ = run_pool(configs, runs_dir, workers=k, log=lambda *_: None)
    per_run = [r.summary["images_per_second"] for r in runs]
    return {"runs": k, "images_per_second_per_run": per_run, "images_per_second_total": sum(per_run),
            "wall_seconds": time.time() - start, "gpu": sampler.summary()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_study", description=__doc__)
    parser.add_argument("--models", nargs="+", default=["wrn-16-4", "wrn-16-8"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results_gpu_study.json"))
    args = parser.parse_args(argv)
    results = {"machine": {"platform": platform.platform(), "gpu": torch.cuda.get_device_name() if
                           torch.cuda.is_available() else None, "torch": torch.__version__, "aace": __version__},
               "setting": f"profile gpu, SAM, {args.epochs} epoch(s) per run", "models": {}}
    with tempfile.TemporaryDirectory() as runs_dir:
        for model in args.models:
            rows = []
            for k in args.concurrency:
                rows.append(measure(model, k, args.epochs, runs_dir, offset=1000 * k))
                r = rows[-1]
                print(f"{model}: {k} at once: {r['images_per_second_total']:.0f} img/s in all "
                      f"({min(r['images_per_second_per_run']):.0f}-{max(r['images_per_second_per_run']):.0f} per run), "
                      f"GPU {((r['gpu'] or {}).get('mean_utilisation_percent') or float('nan')):.0f} %, "
                      f"{r['wall_seconds']:.0f} s", flush=True)
            alone = rows[0]["images_per_second_total"]
            for r in rows:
                r["total_over_alone"] = r["images_per_second_total"] / alone
            results["models"][model] = rows
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
