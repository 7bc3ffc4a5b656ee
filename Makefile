# The two commands of the README: `make book` (the main job) and `make test`.
PY := .venv/bin/python
PROFILE ?= cpu

.PHONY: book test setup bench clean-book

book:
	scripts/setup.sh
	$(PY) -m aace book --profile $(PROFILE)

test:
	scripts/setup.sh --test
	$(PY) -m pytest -q

bench:
	scripts/setup.sh
	$(PY) -m benchmarks

clean-book:
	rm -rf _build

# Re-execute the notebooks at the smoke profile into tests/nbval (the outputs nbval checks against).
nbval-refresh:
	rm -rf /tmp/aace-nbval-runs
	$(PY) -m aace book --profile smoke --no-build --runs-dir /tmp/aace-nbval-runs --output-dir tests/nbval
