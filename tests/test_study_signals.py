"""The study under signals (issue 22): a signalled or killed worker or study ends in one line, leaves no orphan,
records its invocation and resumes. A file of its own so that the test workers run it beside test_study_faults.py
(pytest-xdist's --dist loadfile keeps a file in one worker)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aace import study
from aace.cli import main as cli_main
from aace.pool import children_of
from aace.store import load_run

FAST = ["--profile", "smoke", "--workers", "2", "--epochs", "1"]


def study_argv(runs_dir, *more):
    return ["study", *FAST, "--runs-dir", str(runs_dir), *more]


def leftovers(*folders):
    return sorted(str(p) for f in folders for p in Path(f).rglob("*") if ".tmp" in p.name or ".export-" in p.name
                  or ".replaced-" in p.name)


# ----------------------------------------------------------------------------- 2: signals and dying workers

def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# Two runs (one tuning run and SGD, both in the first phase: two workers train both at once) long enough to be
# signalled mid-run. SIGINT is set to Python's handler: a shell starts background jobs (make test under nohup ... &)
# with it ignored.
TINY_PLAN = study.Plan("smoke", {"sam": (0.05,)}, tuning_seeds=(100,), final_seeds=(0,), final_arms=("sgd",))
# 30 epochs of 128 images (2 steps each), scored on 64: a window of seconds to signal the runs in, at a third of the
# work of 40 epochs of the smoke profile's 256 images, which the resumed cases below must finish.
SLOW = ["--epochs", "30", "--train-subset", "128", "--val-subset", "64", "--test-subset", "64"]
STUDY = f"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from aace import study
from aace.study import Plan
study.PLANS["smoke"] = {TINY_PLAN!r}
from aace.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_study(runs_dir, *more):
    return subprocess.Popen([sys.executable, "-c", STUDY, *study_argv(runs_dir, *SLOW, *more)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_workers(proc, runs_dir, n=2, timeout=180):
    """The study's workers, once ``n`` runs are training (past their first epoch's checkpoint)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        training = [p for p in runs_dir.glob("*-*") if (p / "checkpoint.pt").exists()
                    and not (p / "summary.json").read_text().count('"finished"')]
        kids = [k for k in children_of(proc.pid) if alive(k)]
        if len(training) >= n and len(kids) >= n:
            return kids
        time.sleep(0.1)
    raise AssertionError(f"the study did not start {n} runs: {proc.stderr.read() if proc.poll() is not None else ''}")


def statuses(runs_dir):
    from aace.store import shown_status
    return sorted(shown_status(load_run(p)) for p in runs_dir.glob("*-*") if (p / "config.json").exists())


@pytest.mark.parametrize("target,sig,code,status", [
    ("worker", signal.SIGTERM, 143, "interrupted"), ("worker", signal.SIGKILL, 137, "stale"),
    ("parent", signal.SIGINT, 130, "interrupted"), ("parent", signal.SIGTERM, 143, "interrupted"),
])
def test_a_signalled_worker_or_study_ends_in_one_line_with_no_orphan_and_resumes(tmp_path, target, sig, code,
                                                                                 status, monkeypatch):
    runs_dir = tmp_path / "runs"
    proc = start_study(runs_dir)
    workers = wait_for_workers(proc, runs_dir)
    os.kill(workers[0] if target == "worker" else proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    deadline = time.time() + 30
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not [w for w in workers if alive(w)]  # no orphan
    assert status in statuses(runs_dir) and "running" not in statuses(runs_dir)
    history = json.loads((runs_dir / "study-smoke.json").read_text())
    assert history[-1]["complete"] is False and history[-1].get("ended")  # the interrupted invocation is recorded
    if sig != signal.SIGKILL:  # a SIGKILL mid-write leaves its temporary file: the resumed run removes it
        assert not leftovers(runs_dir)
    if (target, sig) in RESUMED:
        monkeypatch.setitem(study.PLANS, "smoke", TINY_PLAN)
        assert cli_main(study_argv(runs_dir, *SLOW)) == 0  # the same command resumes and completes
        assert set(statuses(runs_dir)) == {"finished"} and not leftovers(runs_dir)


# The resume is tested once per status a signal leaves: 'stale' (a SIGKILLed worker: its temporary file, its lock
# gone with it) and 'interrupted' (a SIGTERM: every run stopped at its checkpoint); the other two signals leave the
# same 'interrupted' state, tested above to be recorded the same way.
RESUMED = {("worker", signal.SIGKILL), ("parent", signal.SIGTERM)}


def test_a_killed_study_takes_its_workers_with_it(tmp_path):
    runs_dir = tmp_path / "runs"
    proc = start_study(runs_dir)
    workers = wait_for_workers(proc, runs_dir)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if alive(w)]
    assert "interrupted" in statuses(runs_dir) and "running" not in statuses(runs_dir)


def test_two_studies_sharing_a_store_count_each_run_once(tmp_path):
    runs_dir = tmp_path / "runs"
    first, second = (start_study(runs_dir, "--workers", "1", "--epochs", "2") for _ in range(2))
    for proc in (first, second):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    history = json.loads((runs_dir / "study-smoke.json").read_text())
    trained = sum(h["runs_trained"] for h in history)
    assert trained == len(list(runs_dir.glob("*-*/summary.json")))
