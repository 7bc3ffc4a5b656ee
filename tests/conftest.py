import os
import shutil
import tempfile
from pathlib import Path

FIXTURE_RUNS = Path(__file__).resolve().parent / "fixtures" / "runs"

# The nbval pages read their smoke runs from a copy of the committed fixture store (made by
# `make nbval-fixture`), frozen: a page that asks for a run the fixture lacks fails instead of training,
# so that no page output depends on this machine's floating-point bits.
if "AACE_RUNS" not in os.environ:
    store = tempfile.mkdtemp(prefix="aace-runs-")
    if FIXTURE_RUNS.is_dir():
        shutil.copytree(FIXTURE_RUNS, store, dirs_exist_ok=True)
        os.environ["AACE_FROZEN_RUNS"] = store
    os.environ["AACE_RUNS"] = store
