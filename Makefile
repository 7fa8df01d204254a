# Each target builds its own virtual environment; constraints.txt pins the torch/torchvision pair that works on CPU.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[test,demo]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m training.demo

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run
