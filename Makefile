# The README's two commands: `make demo` and `make test`. Both install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint clean bench browser sshd

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

test: setup lint browser sshd
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

# Debian's OpenSSH server for the end-to-end `profile --ssh` test (tests/test_remote_ssh.py starts its own sshd
# on 127.0.0.1 at a high port; skipped cleanly without it). Best effort, once per venv, like `browser`.
SSHD_STAMP := $(VENV)/.sshd-tried
sshd:
	@if [ -x /usr/sbin/sshd ]; then exit 0; fi; \
	if [ -e $(SSHD_STAMP) ]; then echo "sshd: no openssh-server (install tried before); its test is skipped"; exit 0; fi; \
	mkdir -p $(VENV) && touch $(SSHD_STAMP); \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "sshd: not root: install openssh-server to run the SSH test; skipped for now"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "sshd: no apt-get: install openssh-server by hand"; exit 0; fi; \
	echo "sshd: installing openssh-server with apt-get (best effort, at most ~5 min, once)"; \
	{ $$SUDO timeout 180 apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive timeout 240 \
	  apt-get install -y -qq openssh-server; } >/dev/null 2>&1 \
	  && echo "sshd: openssh-server installed" || echo "sshd: install failed; the SSH test will be skipped"

demo: setup
	$(BIN)/tleg-deploy demo -o out/demo

clean:
	rm -rf $(VENV) build dist *.egg-info
