# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the tested builds of the extras (CPU torch, ray): pip install -c
CONSTRAINTS := ci/constraints.txt

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# the demo's data needs scikit-learn (the demo extra)
$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	touch $@ $(VENV)/.core

# every extra, at the builds in $(CONSTRAINTS) (CPU torch; ray for the simulator's Ray
# backend tests, tests/sim/test_ray_backend.py; mlflow and tensorboard for tests/trackers)
$(VENV)/.dev: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[dev,demo,certs,torch,keras,ray,plot,postgres,mlflow,tensorboard,privacy,opacus,he]"
	touch $@ $(VENV)/.core $(VENV)/.demo

demo: $(VENV)/.demo
	$(BIN)/fedstack demo --agents 3 --rounds 10 --partition dirichlet:0.5

# the suite under branch coverage ([tool.coverage] in pyproject.toml): on two workers
# (pytest-xdist), then alone the tests marked `serial` (they assert rates and stalls measured
# on this machine); then a floor for the modules every round runs through (measured value
# rounded down, minus 1: raise them as coverage grows, never lower them to make a change pass)
test: $(VENV)/.dev
	$(BIN)/python -m pytest -q -n 2 -m "not serial" --cov=fedstack --cov-branch --cov-report=
	$(BIN)/python -m pytest -q -m serial --cov=fedstack --cov-branch --cov-append --cov-report=
	$(BIN)/coverage report --include='*/fedstack/wire/*' --fail-under=98
	$(BIN)/coverage report --include='*/fedstack/strategies/*' --fail-under=95
	$(BIN)/coverage report --include='*/fedstack/aggregator/rounds.py' --fail-under=99

# ruff's lint rules and formatting, and mypy (strict) on src/fedstack and tests/ (pyproject)
lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench examples experiments
	$(BIN)/ruff format --check src tests bench examples experiments
	$(BIN)/mypy

bench: $(VENV)/.dev
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/demo_overhead.py

clean:
	rm -rf fedstack-demo .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*
