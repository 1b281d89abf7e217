# jax-sae-lab: every target that needs Python builds the virtual environment it needs first.
SHELL := /bin/bash
PYTHON ?= python3

# extraction
MODEL   ?= google/gemma-2-2b
DATASET ?= monology/pile-uncopyrighted
LAYERS  ?= 12
TOKENS  ?= 10000000
CTX     ?= 128
DTYPE   ?= bfloat16
BATCH   ?= 32
OUT     ?=
# training
VARIANT ?= standard
LAYER   ?= $(firstword $(LAYERS))
CACHE   ?=
STEPS   ?=
SET     ?=
SWEEP   ?=
STREAM  ?=
DISK_BUDGET ?=
TRAIN_FLAGS ?=
# export and evaluation
RUN     ?=
EVALS   ?= core absorption scr tpp sparse_probing unlearning
RUNS    ?=
OFFLINE_MODEL ?=
EVAL_FLAGS    ?=
BENCH_FLAGS   ?=
# synthetic worlds; TOKENS is passed only when given on the command line
WORLD   ?= basic
SYNTH_FLAGS ?=
FEATURES_FLAGS ?=

VENV      := .venv
VENV_EVAL := .venv-eval
VENV_PEERS := .venv-peers
PY        := $(VENV)/bin/python
PY_EVAL   := $(VENV_EVAL)/bin/python
PY_PEERS  := $(VENV_PEERS)/bin/python
TINY      := models/tiny-gemma2

DEMO_CACHE := activations_cache/tiny-gemma2__stdlib_docstrings__L1_2
DEMO_RUNS  := runs/demo_standard runs/demo_topk runs/demo_freq runs/demo_temporal
DEMO_SWEEP := runs/demo_sweep
# ~5 epochs of the 200k-token demo cache; normalised inputs so one learning rate suits all variants
DEMO_TRAIN := --cache $(DEMO_CACHE) --layer 2 --normalize --tokens 1000000 --set dead_tokens=100000 \
	--set d_sae=512 --set lr=0.003 --set warmup_steps=20 --resume-if-exists

.PHONY: setup setup-eval test test-fast lint extract tiny-model train features export-eval compare demo bench \
	synthsaebench-world synthsaebench bench-synth-sampler \
	setup-peers bench-peers bench-gpu synth synth-eval synth-bench clean

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

# two workers (pytest-xdist), one test file per worker at a time: module fixtures are built once
test: setup setup-eval
	$(PY) -m pytest -q -n 2 --dist loadfile

# the inner loop: everything but the slow, fault-injection and multi-process tests
test-fast: setup setup-eval
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow and not faults and not multiprocess"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# OUT puts it anywhere (e.g. OUT=~/sae-first/tiny-gemma2); the demo and the tests use models/
tiny-model: setup
	test -f $(or $(OUT),$(TINY))/config.json || $(PY) -m extract.tiny_model --out $(or $(OUT),$(TINY))

extract: setup
	$(PY) -m extract --model $(MODEL) --dataset $(DATASET) --layers $(LAYERS) --tokens $(TOKENS) \
		--ctx-len $(CTX) --dtype $(DTYPE) --batch-size $(BATCH) $(if $(OUT),--out $(OUT)) --resume

train: setup
	@test -n "$(CACHE)" || { echo "error: set CACHE=activations_cache/<run> (made by make extract)" >&2; exit 2; }
	$(PY) train.py --cache $(CACHE) --layer $(LAYER) --variant $(VARIANT) \
		$(if $(STEPS),--steps $(STEPS)) $(foreach kv,$(SET),--set $(kv)) $(foreach kv,$(SWEEP),--sweep $(kv)) \
		$(if $(STREAM),--stream="--model $(MODEL) --dataset $(DATASET) --layers $(LAYERS) \
		--tokens $(TOKENS) --ctx-len $(CTX) --dtype $(DTYPE) --batch-size $(BATCH)") \
		$(if $(DISK_BUDGET),--disk-budget $(DISK_BUDGET)) $(if $(OUT),--out $(OUT)) $(TRAIN_FLAGS) --resume-if-exists

# a static HTML page of the run's latents (RUN/features/index.html; open it from disk)
features: setup
	@test -n "$(RUN)" || { echo "error: set RUN=runs/<name> (a finished training run)" >&2; exit 2; }
	$(PY) -m jax_sae.features $(RUN) $(if $(CACHE),--cache $(CACHE)) $(if $(OUT),--out $(OUT)) \
		$(FEATURES_FLAGS)

export-eval: setup setup-eval
	@test -n "$(RUN)" || { echo "error: set RUN=runs/<name> (a finished training run)" >&2; exit 2; }
	$(PY) export_to_torch.py $(RUN) --replace
	$(PY_EVAL) -m saebench_eval.run $(RUN) --evals $(EVALS) \
		$(if $(OFFLINE_MODEL),--offline-model $(OFFLINE_MODEL)) $(EVAL_FLAGS)

# WORLD=synthsaebench-16k: drawn from that world by the on-device sampler (.venv), into a cache
synth: setup-eval
ifeq ($(WORLD),synthsaebench-16k)
	$(MAKE) synthsaebench-world OUT=
	$(MAKE) setup
	$(PY) -m synth.world_cache --world $(SYNTHSAEBENCH_WORLD) \
		--out $(or $(OUT),activations_cache/synth_$(WORLD)) --resume \
		$(if $(filter command line,$(origin TOKENS)),--tokens $(TOKENS)) $(SYNTH_FLAGS)
else
	$(PY_EVAL) -m synth.make_world --world $(WORLD) --out $(or $(OUT),activations_cache/synth_$(WORLD)) \
		$(if $(filter command line,$(origin TOKENS)),--tokens $(TOKENS)) $(SYNTH_FLAGS)
endif

synth-eval: setup setup-eval
	@test -n "$(RUN)" || { echo "error: set RUN=runs/<name> (a run trained on a make synth world)" >&2; exit 2; }
	$(PY) export_to_torch.py $(RUN) --force
	$(PY_EVAL) -m synth.evaluate $(RUN) $(EVAL_FLAGS)

compare: setup
	@test -n "$(RUNS)" || { echo "error: set RUNS=\"runs/a runs/b\" (runs of one cache; COMPARE_FLAGS=--allow-mismatch flags, not refuses, runs that differ in tokens, normalize, layer or eval_tokens)" >&2; exit 2; }
	$(PY) -m jax_sae.report.compare $(RUNS) --out $(or $(OUT),runs/compare) $(COMPARE_FLAGS)

# The whole pipeline offline on the embedded tiny model: extract -> train -> export -> SAEBench core.
demo: tiny-model setup-eval
	$(PY) -m extract --model $(TINY) --dataset $(TINY)/stdlib_docstrings.jsonl --layers 1 2 \
		--tokens 200000 --ctx-len 128 --batch-size 32 --out $(DEMO_CACHE) --resume
	$(PY) train.py $(DEMO_TRAIN) --variant standard --out runs/demo_standard
	$(PY) train.py $(DEMO_TRAIN) --variant topk --out runs/demo_topk --set k=16
	$(PY) train.py $(DEMO_TRAIN) --variant freq --out runs/demo_freq
	$(PY) train.py $(DEMO_TRAIN) --variant temporal --out runs/demo_temporal
	$(PY) train.py $(DEMO_TRAIN) --variant standard --out $(DEMO_SWEEP) \
		--sweep lambda=0.75,1.5,3,6,12
	$(PY) -m jax_sae.features runs/demo_topk
	$(PY) export_to_torch.py runs/demo_topk --replace
	$(PY_EVAL) -m saebench_eval.run runs/demo_topk --evals core --offline-model $(TINY) \
		--core-reconstruction-batches 10 --core-sparsity-variance-batches 20
	cat $(DEMO_SWEEP)/sweep.md
	$(PY) -m jax_sae.report.compare $(DEMO_RUNS) $(DEMO_SWEEP)/*/ --out runs/demo_compare
	cat runs/demo_compare/comparison.md

# SynthSAEBench-16k's world (SAELens's config classes; ~1 min on 2 CPU cores), which train.py
# samples on the device: make train CACHE=activations_cache/worlds/synthsaebench-16k LAYER=0
SYNTHSAEBENCH_WORLD := activations_cache/worlds/synthsaebench-16k
synthsaebench-world: setup-eval
	$(PY_EVAL) -m synth.synthsaebench --out $(or $(OUT),$(SYNTHSAEBENCH_WORLD))

# our on-device sampler against SAELens's and a training step, and their equivalence at 16k
bench-synth-sampler: setup setup-eval
	$(PY) benchmarks/bench_synth_sampler.py $(BENCH_FLAGS)

# every architecture at L0 25 on SynthSAEBench-16k beside the published table and SAELens's own
# trainer -> benchmarks/SYNTHSAEBENCH.md; FULL=1: the published protocol (200M samples; a GPU)
synthsaebench: setup setup-eval
	$(PY) benchmarks/synthsaebench.py --budget $(if $(FULL),full,cpu) $(BENCH_FLAGS)

# each research variant against its baseline on the world built for it -> benchmarks/SYNTH.md
synth-bench: setup setup-eval
	$(PY) benchmarks/synth_bench.py $(BENCH_FLAGS)

bench: setup
	mkdir -p benchmarks/out
	$(PY) benchmarks/bench_extract.py $(BENCH_FLAGS) | tee benchmarks/out/extract.md
	$(PY) benchmarks/bench_train.py $(BENCH_FLAGS) | tee benchmarks/out/train.md
	$(PY) benchmarks/bench_variants.py $(BENCH_FLAGS) | tee benchmarks/out/variants.md

# every GPU figure we lack in under 8 minutes (a markdown section for RESULTS.md); on a GPU
# machine: make setup && .venv/bin/pip install "jax[cuda13]>=0.6,<0.12" && make tiny-model && make bench-gpu
bench-gpu: setup
	$(PY) benchmarks/bench_gpu.py --out benchmarks/out/gpu.md $(BENCH_FLAGS)

# Side by side with SAELens, sparsify and dictionary_learning (~27 min on 2 CPU cores; not in test).
setup-peers: $(VENV_PEERS)/.installed
$(VENV_PEERS)/.installed: requirements-peers.txt
	test -x $(PY_PEERS) || $(PYTHON) -m venv $(VENV_PEERS)
	$(PY_PEERS) -m pip install -q --upgrade pip
	$(PY_PEERS) -m pip install -q -r requirements-peers.txt
	$(PY_PEERS) -m pip uninstall -q -y torchvision
	touch $@

bench-peers: setup setup-peers
	mkdir -p benchmarks/out
	$(PY) benchmarks/bench_peers.py --peers-python $(PY_PEERS) $(BENCH_FLAGS) | tee benchmarks/out/peers.md

clean:
	rm -rf runs benchmarks/out
