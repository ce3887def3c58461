# The two README commands: `make demo` and `make test`. Both set up .venv on a fresh machine.
# Also: `make test-fast` (no CLI end-to-end tests), `make lint`, `make bench` (quick modes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.poolsift-installed
DEV_STAMP := $(VENV)/.poolsift-dev-installed

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $(STAMP)

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP) $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/poolsift run configs/sample.yaml

# Two pytest workers (pytest-xdist): 838 s instead of 939 s for the whole suite on 2 cores
# (2026-12-07); the Ray modules share one worker (xdist_group "ray"), so no two Ray
# clusters start side by side; they run first (tests/conftest.py), beside the rest. The 25
# slowest tests are listed at the end, to keep the whole run under 15 minutes.
# --max-worker-restart 0: a crashed worker is a failure and the run ends. pytest-xdist 3.8
# replaces a crashed worker, but under loadgroup it hands the crashed test out again and can
# wait for ever on work it never sends (pytest-xdist#1323, #1327, #1378: the CI run on c8069fb
# hung at 98%).
test: $(DEV_STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --max-worker-restart 0 --durations=25

# Leaves out the tests marked slow: every test that runs the CLI or the whole pipeline.
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup --max-worker-restart 0 -m "not slow"

LINT_PATHS := filtering pipelines tests bench

# lint-imports: the import contract in pyproject.toml ([tool.importlinter]): layers, no cycles.
lint: $(DEV_STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports --no-cache

# Every benchmark in its quick mode (minutes on a laptop; the scripts' docstrings give
# the full-scale commands and docs/performance.md the figures).
BENCH_DIR ?= /tmp/poolsift-bench

bench: $(DEV_STAMP)
	$(BIN)/python bench/bench_filters.py --n 100000
	$(BIN)/python bench/bench_dedup.py --n 100000 --baseline-n 20000
	$(BIN)/python bench/bench_clusters.py --n 100000 --k 1000
	$(BIN)/python bench/bench_datacomp.py --rows 100000 --shards 4 --repeat 1
	$(BIN)/python bench/bench_report.py --rows 200000 --shards 4
	$(BIN)/python bench/bench_scoring.py --only tiny
	$(BIN)/python bench/bench_refilter.py --dir $(BENCH_DIR)/refilter --sizes 20k 40k --recipe issue27
	$(BIN)/python bench/bench_first_run.py --dir $(BENCH_DIR)/first-run --sizes 2k 8k
	$(BIN)/python bench/bench_jpeg_draft.py --models tiny --images 16

clean:
	rm -rf runs .pytest_cache
