# `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Each does its own setup (scripts/setup.sh) on a fresh machine.
.PHONY: setup demo test test-fast
VENV := .venv/bin

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/python jobs/reproduce_fve.py --preset mini

test: setup
	$(VENV)/python -m pytest -q

test-fast: setup
	$(VENV)/python -m pytest -q -m "not integration and not ray"
