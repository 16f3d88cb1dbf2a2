# Corral: the two commands a newcomer runs (as root, on Debian 12) are
#   make demo   - set everything up, bring up a 3-host lab, run the demo
#   make test   - set everything up, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup host venv proto api-docs demo test bench lab-down clean

setup: host venv

host:
	bash deploy/setup-host.sh

# The venv is rebuilt only when pyproject.toml changes. The editable install is the
# compat kind (the repository on sys.path): its import hook costs every `corral` ~10 ms.
venv: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

proto: venv
	$(PY) proto/generate.py

# docs/api.md, the API reference, from the .proto files (tests/test_api_reference.py checks it).
api-docs: venv
	$(PY) proto/reference.py

demo: setup
	bash deploy/demo.sh

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: venv
	CORRAL_SETUP_ROLES="agent lab tests bench" bash deploy/setup-host.sh
	$(PY) bench/agent_vs_lxc.py
	$(PY) bench/cli_lifecycle.py

lab-down:
	$(VENV)/bin/corral lab down --name demo

clean: lab-down
	rm -rf $(VENV)
