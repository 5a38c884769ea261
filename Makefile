# Two entry points (see README): `make quickstart` runs the main job, `make test` runs the tests.
# Both create .venv on first use. torch==2.13.0 is installed before the package so that resolving
# megatron-core's requirements never pulls a CUDA build onto a CPU machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

.PHONY: install quickstart test test-fast demo
install: $(VENV)/.installed

quickstart: install
	PYTHON=$(abspath $(PY)) bash examples/quickstart.sh

demo: install
	PYTHON=$(abspath $(PY)) bash examples/demo.sh

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=20 -n 2 --dist loadfile  # two workers, a file each; the slowest, to keep the 2-core run under 25 minutes

test-fast: install
	$(PY) -m pytest -q -m "not slow"
