# The README's two commands: `make demo` and `make test`. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean bench browser

setup: $(STAMP)

# torch first, pinned to the CPU build on this machine's disk; a looser spec would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# ruff everywhere; mypy (strict) on the torch-free modules listed in pyproject.toml's [tool.mypy] files.
lint: setup
	$(BIN)/ruff check tleg_deploy tests benchmarks
	$(BIN)/mypy

test: setup lint browser
	$(BIN)/python -m pytest

# Every benchmark, then benchmarks/RESULTS.md and the report in benchmarks/report/ (prints the expected duration).
bench: setup
	$(BIN)/python benchmarks/run_all.py

# Headless Chromium for the report's HTML test (skipped when absent). Best effort, never fails the build:
# apt-get as root (or passwordless sudo) with time limits, tried once per venv (rm $(BROWSER_STAMP) to retry).
BROWSER_STAMP := $(VENV)/.browser-tried
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi; \
	if [ -e $(BROWSER_STAMP) ]; then echo "browser: no chromium (install tried before); its test is skipped"; exit 0; fi; \
	mkdir -p $(VENV) && touch $(BROWSER_STAMP); \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "browser: not root: install chromium to run the HTML test; skipped for now"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "browser: no apt-get: install chromium by hand"; exit 0; fi; \
	echo "browser: installing chromium, chromium-driver with apt-get (best effort, at most ~10 min, once)"; \
	{ $$SUDO timeout 180 apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive timeout 420 \
	  apt-get install -y -qq chromium chromium-driver; } >/dev/null 2>&1 \
	  && echo "browser: chromium installed" || echo "browser: install failed; the HTML test will be skipped"

demo: setup
	$(BIN)/tleg-deploy demo -o out/demo

clean:
	rm -rf $(VENV) build dist *.egg-info
