# The two commands a newcomer needs:
#   make run    the default ablation grid (grids/smoke.yaml) on CPU: Parquet + plots in results/smoke/
#   make test   ruff (lint + format check), then the test suite (what CI runs)
# Both create .venv, install the dependencies and the offline corpora when missing; re-running is safe.
PY := .venv/bin/python
GRID ?= smoke
ARGS ?=
# Test processes (pytest-xdist): one per core. The suite is mostly single-threaded work (the Triton
# interpreter, small models): on a 2-core machine two workers took pytest from 743 s to 399-508 s.
TEST_WORKERS ?= auto

.PHONY: run test lint format setup data report reports bench-gpu clean-runs

setup:
	@bash scripts/bootstrap.sh

data: setup
	@bash scripts/prepare_corpora.sh

run: data
	$(PY) run_ablations.py run $(GRID) $(ARGS)

report: setup
	$(PY) run_ablations.py report $(GRID)

# Every committed report regenerated from its committed results.parquet (no runs folder, no GPU).
reports: setup
	@for parquet in results/*/results.parquet; do \
		$(PY) run_ablations.py report "$$(basename "$$(dirname "$$parquet")")" --from-parquet "$$parquet" || exit 1; \
	done

# Lint and format check first (seconds), then the tests.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# pytest exits 5 when it collects no tests (e.g. a -k filter matching nothing): not a failure here.
test: data lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

clean-runs:
	rm -rf runs
