"""Pilot for the label-noise testbed (issue 23): does SAM beat SGD on the cpu profile under symmetric noise?

Small on purpose (a few seeds per arm, one thread per run): its job is to size the reference study, not to
carry a verdict. Writes one JSON line per run to the given file (final and best-validation-epoch test
accuracy), resumable through the run store.
Usage: python scripts/pilot_noise.py OUT.jsonl RUNS_DIR [ARMS_JSON [SEEDS_JSON]]
  ARMS_JSON: [[method, rho, normalize], ...] (default: SGD and SAM at 0.05, 0.1, 0.2)
"""
import json
import sys
from pathlib import Path

from aace.config import profile_config
from aace.train import run

out, runs_dir = Path(sys.argv[1]), sys.argv[2]
ARMS = json.loads(sys.argv[3]) if len(sys.argv) > 3 else [["sgd", None, None], ["sam", 0.05, None],
                                                          ["sam", 0.1, None], ["sam", 0.2, None]]
SEEDS = json.loads(sys.argv[4]) if len(sys.argv) > 4 else [0, 1]
NOISE = (0.4,)
for noise in NOISE:
    for seed in SEEDS:
        for method, rho, normalize in ARMS:
            config = profile_config("cpu", method=method, rho=rho, normalize=normalize, seed=seed,
                                    label_noise=noise)
            r = run(config, runs_dir, progress=False)
            m = r.metrics.dropna(subset=["val_acc"])
            best = m.loc[m["val_acc"].idxmax()]
            row = {"noise": noise, "method": method, "rho": rho, "normalize": config.normalize, "seed": seed, "status": r.status,
                   "train_acc": r.summary.get("train_acc"), "final_test_full": r.summary.get("full_test_acc"),
                   "final_test_1k": r.summary.get("test_acc"), "best_epoch": int(best["epoch"]),
                   "best_val": float(best["val_acc"]), "best_test_1k": float(best["test_acc"]),
                   "wall_seconds": r.summary.get("wall_seconds"), "run": r.path.name}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
