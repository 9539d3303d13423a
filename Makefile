# itmolink: the quick start is `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv proto check-proto lint typecheck test demo sim clean

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
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) check-proto lint typecheck
	$(PY) -m pytest -q

# A long deterministic-simulation sweep (make test runs 2,000 seeds).
SIM_SEEDS ?= 10000
sim: $(STAMP)
	$(PY) -m tests.sim --seeds $(SIM_SEEDS)

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache demo-run
