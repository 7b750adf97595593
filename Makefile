# Set-up and checks. On this project's machines `pip install torch==2.13.0` takes a local CPU wheel;
# elsewhere override TORCH (e.g. `make test TORCH=torch CONSTRAINTS=/dev/null`).
PYTHON ?= python3
TORCH ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
PIP = $(PYTHON) -m pip install -q -c $(CONSTRAINTS)

.PHONY: install demo test bench lint docs

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PIP) -e ".[demo,test]"

demo: install
	$(PYTHON) -m curvkit demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PIP) -e ".[bench]"
	$(PYTHON) benchmarks/engine_vs_anchors.py
	$(PYTHON) benchmarks/scale_and_landscape.py

lint: install
	$(PYTHON) -m ruff check curvkit tests benchmarks docs

# The documentation site (mkdocs.yml, docs/hooks.py) into site/; --strict makes every warning (a broken
# docstring, a dead link) an error.
docs: install
	$(PIP) -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict
