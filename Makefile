# Set-up is part of every target: the first run creates .venv and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FSVIDEO := $(VENV)/bin/fsvideo
STAMP := $(VENV)/.installed
DATA ?= data/sample
export WANDB_SILENT ?= true

.PHONY: setup demo test test-fast lint clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(DATA)/.complete: $(STAMP)
	$(FSVIDEO) data sample --out $(DATA)
	touch $@

# The main job on the bundled sample data (see README "What the demo does").
demo: $(DATA)/.complete
	bash demo.sh $(DATA)

# Every test, the slow end-to-end ones included (what CI runs), one worker per CPU core.
test: $(STAMP)
	$(PY) -m pytest -n auto --dist worksteal

# The quick loop while developing: skips tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -n auto --dist worksteal -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --no-cache --check .

clean-runs:
	rm -rf runs
