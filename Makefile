# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# torch==2.13.0 is the CPU build on these machines (a loose pin pulls a CUDA build);
# ray for the simulator's Ray backend tests (tests/sim/test_ray_backend.py)
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev,torch,ray]"
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(BIN)/fedstack demo --agents 3 --rounds 10 --partition dirichlet:0.5

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check src tests bench examples experiments
	$(BIN)/mypy

bench: $(VENV)/.dev
	$(BIN)/python bench/transfer.py
	$(BIN)/python bench/demo_overhead.py

clean:
	rm -rf fedstack-demo .pytest_cache .mypy_cache .ruff_cache
