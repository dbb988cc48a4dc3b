# One-command entry points. `make demo` and `make test` set up the venv when needed.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m chain_spec_ros.demo
	$(PY) -m chain_spec_ros.replay.demo --bag data/demo_drive --seconds 30 --out runs/ros_demo

test: $(STAMP)
	$(PY) -m pytest -q test

clean-venv:
	rm -rf $(VENV)
