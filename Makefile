# Each target builds its own virtual environment; constraints.txt pins the torch/torchvision pair that works on CPU.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-compat bench

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,demo]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m training.demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=25

# The inner loop: no process launches, no training past a few steps (tests marked slow are left out).
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" --durations=10

# The model, processor and trainer tests against the oldest transformers setup.cfg admits, in a venv of their own.
OLDEST_TRANSFORMERS := $(shell sed -n 's/^ *transformers>=\([0-9.]*\).*/\1/p' setup.cfg)
COMPAT_VENV ?= .venv-compat
COMPAT_TESTS := tests/test_upstream_contracts.py tests/test_modeling.py tests/test_configuration.py \
	tests/test_image_processing.py tests/test_pipeline.py tests/training/test_trainer.py

$(COMPAT_VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q -c constraints.txt -e ".[test]" "transformers==$(OLDEST_TRANSFORMERS)"
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run
