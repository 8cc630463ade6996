# `make demo` runs the main job on the embedded default; `make test` runs the test suite.
# Each does its own setup (scripts/setup.sh) on a fresh machine.
.PHONY: setup demo test test-fast
VENV := .venv/bin

setup:
	@bash scripts/setup.sh

# cross-family transfer (§7) on the embedded default: SmolLM2-135M L20 x Gemma-3-270M L12, CPU;
# writes runs/cross_family/mini/ (git-ignored)
demo: setup
	$(VENV)/python jobs/cross_family.py --preset mini

test: setup
	$(VENV)/python -m pytest -q

test-fast: setup
	$(VENV)/python -m pytest -q -m "not integration and not ray"
