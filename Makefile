# Two commands for a newcomer (see README.md):
#   make demo   set up the core (what the demo needs), then run the demo on the embedded hinged molecule
#   make test   set everything up (widgets and GUI test tooling too), then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
STAMP := $(VENV)/.cryoformer-setup
# what the demo needs: the core alone (no widgets, no GUI system packages), a faster set-up
CORE_STAMP := $(VENV)/.cryoformer-core

.PHONY: setup setup-core demo test clean

setup: $(STAMP)

setup-core: $(CORE_STAMP)

$(STAMP): pyproject.toml widgets/pyproject.toml scripts/setup.sh
	PYTHON=$(PYTHON) bash scripts/setup.sh $(VENV)
	touch $@ $(CORE_STAMP)

$(CORE_STAMP): pyproject.toml scripts/setup.sh
	CRYOFORMER_PROFILE=core PYTHON=$(PYTHON) bash scripts/setup.sh $(VENV)
	touch $@

demo: setup-core
	$(VENV)/bin/cryoformer demo -o demo_out --force  # demo_out is make's own scratch folder

test: setup
	$(VENV)/bin/python -m pytest

clean:
	rm -rf demo_out .pytest_cache
