# jax-sae-lab: every target that needs Python builds the virtual environment it needs first.
SHELL := /bin/bash
PYTHON ?= python3

# extraction (SPEC 2)
MODEL   ?= google/gemma-2-2b
DATASET ?= monology/pile-uncopyrighted
LAYERS  ?= 12
TOKENS  ?= 10000000
CTX     ?= 128
DTYPE   ?= bfloat16
BATCH   ?= 32
OUT     ?=
# training (SPEC 4)
VARIANT ?= standard
LAYER   ?= $(firstword $(LAYERS))
CACHE   ?=
STEPS   ?=
SET     ?=
# export and evaluation (SPEC 5)
RUN     ?=
EVALS   ?= core absorption scr tpp sparse_probing unlearning
RUNS    ?=

VENV      := .venv
VENV_EVAL := .venv-eval
PY        := $(VENV)/bin/python
PY_EVAL   := $(VENV_EVAL)/bin/python
TINY      := models/tiny-gemma2

.PHONY: setup setup-eval test lint extract tiny-model train export-eval compare demo bench clean

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup-eval: $(VENV_EVAL)/.installed
$(VENV_EVAL)/.installed: requirements-eval.txt
	test -x $(PY_EVAL) || $(PYTHON) -m venv $(VENV_EVAL)
	$(PY_EVAL) -m pip install -q --upgrade pip
	$(PY_EVAL) -m pip install -q -r requirements-eval.txt
	$(PY_EVAL) -m pip uninstall -q -y torchvision
	touch $@

test: setup setup-eval
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

tiny-model: setup
	test -f $(TINY)/config.json || $(PY) -m extract.tiny_model --out $(TINY)

extract: setup
	$(PY) -m extract --model $(MODEL) --dataset $(DATASET) --layers $(LAYERS) --tokens $(TOKENS) \
		--ctx-len $(CTX) --dtype $(DTYPE) --batch-size $(BATCH) $(if $(OUT),--out $(OUT)) --resume

clean:
	rm -rf runs benchmarks/out
