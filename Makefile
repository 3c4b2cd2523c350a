# The README's two commands: `make demo` (the main job on the embedded tiny models) and `make test`.
PYTHON ?= python3

.PHONY: install tiny demo test

install:
	PYTHON=$(PYTHON) bash scripts/setup.sh

tiny: install
	$(PYTHON) scripts/make_tiny_models.py

demo: tiny
	gkd-train --config examples/tiny.yaml

test: install
	$(PYTHON) -m pytest
