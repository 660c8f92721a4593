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

# Best-effort Debian packages for the tests that need them (each skipped cleanly without): apt-get as root
# (or passwordless sudo) with time limits, tried once per venv (rm the stamp to retry); never fails the build.
# $(call apt_best_effort,NAME,PRESENT-TEST,PACKAGES,STAMP,INSTALL-SECONDS,WHAT-IT-IS-FOR)
define apt_best_effort
	@if $(2); then exit 0; fi; \
	if [ -e $(4) ]; then echo "$(1): not installed (tried before); $(6) is skipped"; exit 0; fi; \
	mkdir -p $(VENV) && touch $(4); \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "$(1): not root: install $(3) to run $(6); skipped for now"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "$(1): no apt-get: install $(3) by hand"; exit 0; fi; \
	echo "$(1): installing $(3) with apt-get (best effort, once)"; \
	{ $$SUDO timeout 180 apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive timeout $(5) \
	  apt-get install -y -qq $(3); } >/dev/null 2>&1 \
	  && echo "$(1): $(3) installed" || echo "$(1): install failed; $(6) will be skipped"
endef

# Headless Chromium for the report's HTML test.
BROWSER_STAMP := $(VENV)/.browser-tried
browser:
	$(call apt_best_effort,browser,command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1,chromium chromium-driver,$(BROWSER_STAMP),420,the HTML test)

# Debian's OpenSSH server for the end-to-end `profile --ssh` test (tests/test_remote_ssh.py starts its own
# sshd on 127.0.0.1 at a high port).
SSHD_STAMP := $(VENV)/.sshd-tried
sshd:
	$(call apt_best_effort,sshd,[ -x /usr/sbin/sshd ],openssh-server,$(SSHD_STAMP),240,the SSH test)

demo: setup
	$(BIN)/tleg-deploy demo -o out/demo

clean:
	rm -rf $(VENV) build dist *.egg-info
