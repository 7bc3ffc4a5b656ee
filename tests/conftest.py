import os
import tempfile

# Notebooks checked by nbval train their smoke runs into a fresh store, never into ./runs.
os.environ.setdefault("AACE_RUNS", tempfile.mkdtemp(prefix="aace-runs-"))
