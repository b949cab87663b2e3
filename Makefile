# prfl developer entry points; both work on a fresh machine.
#   make demo  creates .venv, installs prfl alone (no test, Flower or privacy extras) and the
#              Fashion-MNIST files the machine's package manager offers, then runs `prfl run`.
#   make test  installs the dev, flower and privacy extras, the offline data sets and a headless
#              Chromium (for the report's browser test), then runs the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.prfl-core
FULL := $(VENV)/.prfl-test

.PHONY: setup data browser test demo bench clean

setup: $(FULL) data browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# prfl and its run-time dependencies only: what `prfl run` needs
$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(CORE)

# everything the test suite needs: pytest and hypothesis, Flower (with Ray), dp-accounting
$(FULL): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,flower,privacy]'
	touch $(CORE) $(FULL)

data:
	@bash scripts/install-data.sh

browser:
	@bash scripts/install-browser.sh

test: $(FULL) data browser
	$(BIN)/python -m pytest -q

demo: $(CORE) data
	$(BIN)/prfl run

# each benchmark is run on its own: see benchmarks/README.md
bench: $(FULL) data
	@echo "benchmarks are run one at a time, e.g. $(BIN)/python benchmarks/bench_simulator.py; see benchmarks/README.md"

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
