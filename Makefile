# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-gpu demo test lint format

install:
	bash scripts/install.sh

install-gpu:
	bash scripts/install.sh --gpu

# Set everything up, then train and evaluate the demo model on the CPU.
demo: install
	$(PY) train_net.py --config-file configs/Demo/bagtricks_R18_synthetic.yml

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Set everything up, lint (blocking), run the test suite.
test: install lint
	$(PY) -m pytest -q tests
