# The README's two commands: `make demo` and `make test`. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean

setup: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk; a looser spec would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check tleg_deploy tests benchmarks

test: setup lint
	$(BIN)/python -m pytest

demo: setup
	$(BIN)/tleg-deploy demo -o out/demo

clean:
	rm -rf $(VENV) build dist *.egg-info
