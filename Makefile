# One venv, CPU torch by default. GPU users: `make install TORCH_SPEC=torch` (or any CUDA build)
# keeps pip from swapping their torch; an already-installed torch that satisfies the spec stays.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo demo-quick test test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"

demo: install
	$(BIN)/wadi-train demo -o reports/digits

demo-quick: install
	$(BIN)/wadi-train demo --quick -o reports/digits-quick

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q --run-slow $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/compare_sd15.py
	$(BIN)/python bench/lorad_step.py

clean:
	rm -rf $(VENV) reports/digits-quick .cache .pytest_cache
