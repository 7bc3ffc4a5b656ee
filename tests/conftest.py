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


@pytest.fixture(scope="session")
def smoke_study_store(tmp_path_factory, request):
    """The smoke study (``study --profile smoke --workers 2``) trained once for the whole session into one store,
    shared by every test worker (pytest-xdist): the first worker to ask trains it under a file lock, the others
    wait and read it. Tests copy it before changing anything in it."""
    root = tmp_path_factory.getbasetemp()
    if hasattr(request.config, "workerinput"):  # an xdist worker: its base folder's parent is the session's
        root = root.parent
    store, done = root / "shared-smoke-study", root / "shared-smoke-study.done"
    with open(root / "shared-smoke-study.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            from aace.cli import main as cli_main
            assert cli_main(["study", "--profile", "smoke", "--workers", "2", "--threads", "1", "--runs-dir",
                             str(store)]) == 0
            done.write_text("trained\n")
    return store


# ----------------------------------------------------------------------------- the order the workers take files in

# The longest files first (measured with --durations on 2 cores), so that the two workers end together instead of
# one finishing a long file alone; and a file that trains the shared smoke study above early, so that the other
# files that read it find it done instead of waiting for it. pytest-xdist's --dist loadfile hands out files in
# the order collected; within a file the order is kept (nbval runs a page's cells in order).
LONGEST_FIRST = ("test_study_faults.py", "test_reliability.py", "test_reference.py", "test_slurm.py",
                 "test_study_signals.py", "test_train.py", "test_study.py", "test_distributed.py", "test_faults.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
