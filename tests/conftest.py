import os
import shutil
import tempfile
from pathlib import Path

FIXTURE_RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"

# Under pytest-xdist each worker (and each process it starts: runs, kernels) gets its share of the cores, before
# torch is imported: two workers of two threads each on two cores spend their time waiting for each other.
# Runs that fix their thread count (every profile the tests train but 'paper' and 'gpu') are not affected.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))

# The nbval pages read their smoke runs from a copy of the committed fixture store (made by
# `make nbval-fixture`), frozen: a page that asks for a run the fixture lacks fails instead of training,
# so that no page output depends on this machine's floating-point bits.
if "AACE_RUNS" not in os.environ:
    store = tempfile.mkdtemp(prefix="aace-runs-")
    if FIXTURE_RUNS.is_dir():
        shutil.copytree(FIXTURE_RUNS, store, dirs_exist_ok=True)
        os.environ["AACE_FROZEN_RUNS"] = store
    os.environ["AACE_RUNS"] = store


# ----------------------------------------------------------------------------- one smoke study for the session

import fcntl  # noqa: E402

import pytest  # noqa: E402


SMOKE_EXPORT = Path(__file__).resolve().parent / "fixtures" / "study-smoke"


@pytest.fixture(scope="session")
def smoke_study_store(tmp_path_factory, request):
    """A store holding the whole smoke study (``study --profile smoke --workers 2 --threads 1``), seeded from its
    committed export (``make nbval-fixture``) instead of trained: training it cost the suite 48 s on 2 cores. Nothing
    here was trained on this machine, so a test that compares bits trains its own runs (test_slurm does). One copy
    for the whole session, shared by every test worker (pytest-xdist) under a file lock; tests copy it before
    changing anything in it."""
    import gzip
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: its base folder's parent is the session's
        root = root.parent
    store, done = root / "shared-smoke-study", root / "shared-smoke-study.done"
    with open(root / "shared-smoke-study.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            for run in sorted((SMOKE_EXPORT / "runs").iterdir()):  # an export gzips steps.csv; a store does not
                (store / run.name).mkdir(parents=True)
                for f in run.iterdir():
                    target = store / run.name / f.name.removesuffix(".gz")
                    target.write_bytes(gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes())
            done.write_text("seeded\n")
    return store


# ----------------------------------------------------------------------------- the order the workers take files in

# The longest files first (measured with --durations on 2 cores), so that the workers end together instead of one
# finishing a long file alone. pytest-xdist's --dist loadfile hands out files in the order collected; within a
# file the order is kept (nbval runs a page's cells in order).
LONGEST_FIRST = ("test_reliability.py", "test_study_signals.py", "test_slurm.py", "test_study_faults.py",
                 "test_reference.py", "test_study.py", "test_distributed.py", "test_train.py", "test_faults.py",
                 "own_training_loop.ipynb", "test_analysis.py", "test_book_html.py", "test_imbalance.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
