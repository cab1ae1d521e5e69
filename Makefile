# Two commands set a fresh machine up and prove it:
#   make demo   - install the core into .venv/ and pre-train a tiny BERT on the built-in corpus
#   make test   - install everything into .venv/ and run the whole test suite (what .ci/run calls)
# torch is pinned and installed first; everything else goes through constraints.txt so that no
# dependency can replace the CPU build with a several-GB CUDA one. The demo needs only the core
# packages; `make install` (and `make test`) add the extras: transformers, Triton, MPI, tests.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE := $(VENV)/.installed-core
STAMP := $(VENV)/.installed

.PHONY: install demo demo-ja test lint clean

$(CORE): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,triton]"
	touch $(STAMP)

install: $(STAMP)

demo: $(CORE)
	$(PY) -m pretrain.demo --lang en --out runs/demo

demo-ja: $(CORE)
	$(PY) -m pretrain.demo --lang ja --out runs/demo-ja

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
