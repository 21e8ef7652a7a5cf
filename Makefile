# Every target does its own set-up on a fresh Debian machine; re-running is fast when nothing changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEB_PACKAGES := dataset-fashion-mnist wrk prometheus
CHECKPOINT := checkpoints/puppet-cnn-fmnist.safetensors
TWIN := checkpoints/static-twin-fmnist.safetensors

.PHONY: setup system-deps bench-system-deps test test-slow lint serve bench bench-env bench-peers train train-twin ablations evaluate clean

setup: $(STAMP) system-deps

# Python packages: torch pinned to the CPU wheel first, then the project with its dev extra.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Debian packages the tests need: installed when root, otherwise named so a person can install them.
system-deps:
	@missing=$$(for p in $(DEB_PACKAGES) $(EXTRA_DEB_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "missing Debian packages: $$missing -- run: sudo apt-get install --no-install-recommends $$missing"; exit 1; \
	  fi; \
	fi

# glibc keeps activation buffers mapped between batches; one torch thread (the other core runs HTTP)
SERVE_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=268435456 MALLOC_TOP_PAD_=67108864

serve: setup
	$(SERVE_ENV) $(VENV)/bin/puppet-cnn serve

bench: setup
	$(PY) -m benchmarks.service_bench --out docs/benchmarks-service.json

# Peer servers, each in its own environment (.venv-peers/<name>), never in the service's dependencies: torch (the
# CPU wheel), the model code's few libraries (benchmarks/peers/requirements-common.txt), then the peer's own pins.
# Triton's Python backend stub loads the system's libpython, so its environment is made from Debian's python3.11.
PEERS := litserve ray bentoml kserve triton
PEER_PYTHON_triton := /usr/bin/python3.11
bench-env: bench-system-deps $(foreach p,$(PEERS),.venv-peers/$(p)/.installed)

# Two pip calls after torch: a peer's own pins may override a common one (PyTriton 0.7.0 needs numpy < 2).
.venv-peers/%/.installed: benchmarks/peers/requirements-%.txt benchmarks/peers/requirements-common.txt
	test -x .venv-peers/$*/bin/python || $(or $(PEER_PYTHON_$*),$(PYTHON)) -m venv .venv-peers/$*
	.venv-peers/$*/bin/python -m pip install --quiet torch==2.13.0
	.venv-peers/$*/bin/python -m pip install --quiet -r benchmarks/peers/requirements-common.txt
	.venv-peers/$*/bin/python -m pip install --quiet -r benchmarks/peers/requirements-$*.txt
	touch $@

# Debian's python3.11 with venv, and the libpython that Triton's Python backend stub loads
bench-system-deps:
	$(MAKE) system-deps EXTRA_DEB_PACKAGES="python3.11-venv libpython3.11"

# Ours (defaults, and torch) against Triton, Ray Serve, BentoML, KServe, LitServe, a plain FastAPI endpoint and an
# HTTP ceiling: one load, systems alternating; prints the table and the ratios, writes docs/benchmarks-peers.*
bench-peers: setup bench-env system-deps
	$(PY) -m benchmarks.peer_bench --out docs/benchmarks-peers.json --plot docs/benchmarks-peers.png

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

# The long reliability runs (about 15 minutes); make test runs their short versions.
test-slow: setup
	$(VENV)/bin/pytest -m slow -s tests/test_reliability.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Full training of the shipped checkpoint and its static twin (resumes). The puppet: NPROC DDP processes (both cores
# of the 2-core CPU, a 256-image global batch) distilling from the shipped twin, then its routers calibrated on the
# validation split. On a CPU about 5 minutes an epoch; on one GPU run it with NPROC=1 BATCH=256 (same global batch).
NPROC ?= 2
BATCH ?= 128
TORCHRUN := OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC) --no-python $(VENV)/bin/puppet-cnn
PUPPET_RECIPE = --teacher $(TWIN) --epochs 20 --batch-size $(BATCH) --threads 1
train: setup
	$(TORCHRUN) train $(PUPPET_RECIPE) --out $(CHECKPOINT) --resume
	$(VENV)/bin/puppet-cnn calibrate-routers --checkpoint $(CHECKPOINT) --threads 1

train-twin: setup
	$(VENV)/bin/puppet-cnn train --kind twin --depth-sampling max --epochs 20 --threads 1 --out $(TWIN) --resume

# The ablations of docs/model-report.md on the full recipe (not yet trained: hours on this CPU, minutes on a GPU):
# the ODE puppeteer against tied kernels at equal stored numbers (38,789 and 38,735), two seeds each, and a plain CNN
# of the puppet's stored-number count (widths 8,11,18 at depth 4: 38,804). Every seed keeps the twin's validation
# split (--split-seed 0), which the teacher never trained on.
ABLATIONS := checkpoints/ablation
# make evaluate reports the full-recipe ablations once they exist, else the 3-epoch pair trained before them
FULL_ODE := $(wildcard $(ABLATIONS)/ode-s*.safetensors)
FULL_TIED := $(wildcard $(ABLATIONS)/tied-s*.safetensors)
FULL_PLAIN := $(wildcard $(ABLATIONS)/plain-cnn-*.safetensors)
ABLATION_FLAGS := $(if $(FULL_ODE)$(FULL_TIED),$(if $(FULL_ODE),--ablation-ode $(FULL_ODE)) $(if $(FULL_TIED),--ablation-tied $(FULL_TIED)),--ablation-ode $(ABLATIONS)/ode-puppeteer-3ep.safetensors --ablation-tied $(ABLATIONS)/tied-kernels-3ep.safetensors) $(if $(FULL_PLAIN),--plain-cnn $(FULL_PLAIN))
ablations: setup
	for seed in 0 1; do \
	  $(TORCHRUN) train $(PUPPET_RECIPE) --seed $$seed --split-seed 0 --out $(ABLATIONS)/ode-s$$seed.safetensors --resume && \
	  $(TORCHRUN) train $(PUPPET_RECIPE) --tied --ranks 14,20,24 --seed $$seed --split-seed 0 --out $(ABLATIONS)/tied-s$$seed.safetensors --resume \
	  || exit 1; \
	done
	$(TORCHRUN) train $(PUPPET_RECIPE) --kind twin --depth-sampling max --widths 8,11,18 --out $(ABLATIONS)/plain-cnn-39k.safetensors --resume

evaluate: setup
	$(VENV)/bin/puppet-cnn evaluate --checkpoint $(CHECKPOINT) --twin $(TWIN) --threads 1 --out docs $(ABLATION_FLAGS)

clean:
	rm -rf $(VENV) .venv-peers .pytest_cache .ruff_cache *.egg-info
