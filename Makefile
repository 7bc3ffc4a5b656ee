# The two commands of the README: `make book` (the main job) and `make test`.
PY := .venv/bin/python
PROFILE ?= cpu

.PHONY: book test setup bench clean-book nbval-fixture

book:
	scripts/setup.sh
	$(PY) -m aace book --profile $(PROFILE)

# Three workers on 2 cores, each test file in one of them (nbval keeps a notebook's cells in order): many tests wait
# on processes they start (runs, kernels, Slurm), and a third worker fills those waits: 291 s against 315 with two
# on a fresh clone here (the "Using the code" page gives the measurements).
test:
	scripts/setup.sh --test
	$(PY) -m pytest -q -n 3 --dist loadfile

bench:
	scripts/setup.sh
	$(PY) -m benchmarks

clean-book:
	rm -rf _build

# The nbval fixture: train the smoke runs every page needs into tests/fixtures/runs and record the pages'
# outputs from them into tests/nbval, with the smoke studies' exports that the GPU-scale sections and the intro's
# reference answer read (the smoke copies of the reference studies in results/).
# Rerun it (and commit both) after a change to a page, to what a page trains, or to anything that changes a
# run's numbers (a new aace.__version__).
nbval-fixture:
	scripts/setup.sh
	rm -rf tests/fixtures/runs tests/fixtures/study-smoke tests/fixtures/study-smoke-noise \
	  tests/fixtures/study-smoke-imbalanced /tmp/aace-checkpoints-read \
	  /tmp/aace-study-smoke
	$(PY) -m aace study --profile smoke --workers 2 --threads 1 --runs-dir /tmp/aace-study-smoke \
	  --export tests/fixtures/study-smoke
	$(PY) -m aace study --profile smoke-noise --workers 2 --runs-dir /tmp/aace-study-smoke \
	  --export tests/fixtures/study-smoke-noise
	$(PY) -m aace study --profile smoke-imbalanced --workers 2 --runs-dir /tmp/aace-study-smoke \
	  --export tests/fixtures/study-smoke-imbalanced
	$(PY) scripts/pins.py --write-fixtures
	env -u AACE_FROZEN_RUNS AACE_CHECKPOINT_LOG=/tmp/aace-checkpoints-read $(PY) -m aace book --profile smoke \
	  --rerun --no-build --runs-dir tests/fixtures/runs --output-dir tests/nbval
	find tests/fixtures/runs -name lock -delete
	rm -f tests/fixtures/runs/study-*.json
	for d in tests/fixtures/runs/*/; do grep -qx "$$(basename $$d)" /tmp/aace-checkpoints-read || rm -f $$d/checkpoint.pt; done
	rm -f /tmp/aace-checkpoints-read
	du -sh tests/fixtures/runs
