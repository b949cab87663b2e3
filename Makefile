# prfl developer entry points. `make test` and `make demo` work on a fresh machine:
# they create .venv, install the project with its dev, flower and privacy extras, and fetch the offline data sets
# that the machine's package manager provides.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prfl-installed

.PHONY: setup data test demo bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,flower,privacy]'
	touch $(STAMP)

data:
	@bash scripts/install-data.sh
	@bash scripts/install-browser.sh

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/prfl run

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
