# The two README commands. Both create/refresh .venv/ first (a no-op when it is up to date).
.PHONY: setup demo test lint gpu-setup
VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup_env.sh cpu

gpu-setup:
	@bash scripts/setup_env.sh gpu

demo: setup
	$(PY) launch/train.py $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
