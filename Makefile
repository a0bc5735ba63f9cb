# The contract with new users: `make demo` and `make test` set everything up from nothing.
# Both are idempotent: stamp files in .venv make a second run skip the setup it already did.

SHELL       := /bin/bash
PYTHON      ?= $(shell command -v python3.11 || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# Every package make installs, transitive ones included, pinned (torch 2.14.1 + torchvision 0.29.1 from
# this machine's disk). Regenerate with `make lock` after `make test-latest` passes (docs/install.md).
LOCK        := requirements.lock
EXTRAS      := train,data,test,build
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME   ?= /usr/local/cuda
# Build the CUDA backend of srdiff._C whenever nvcc is there, GPU or not (CI compiles it too).
FORCE_CUDA  ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS    ?= 2
PYTEST_ARGS ?=
export CUDA_HOME TORCH_CUDA_ARCH_LIST MAX_JOBS

EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py srdiff/_sources.py

.PHONY: all install demo test latest-env test-latest lock bench bench-report ablation ablation-report clean

all: test

# --no-compile: no byte-compiling of torch's thousands of modules at install (each compiles on first import).
$(VENV)/.stamp-deps: $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --no-compile -r $(LOCK)
	@touch $@

# srdiff._C, editable. .stamp-build-cuda1 has the CUDA backend (what `make test` checks), .stamp-build-cuda0
# the CPU kernels alone (enough for the demo; a CUDA build serves the demo too). One flavour at a time.
$(VENV)/.stamp-build-cuda%: $(VENV)/.stamp-deps $(EXT_SOURCES) pyproject.toml
	@echo "building srdiff._C: FORCE_CUDA=$* TORCH_CUDA_ARCH_LIST='$(TORCH_CUDA_ARCH_LIST)' CUDA_HOME=$(CUDA_HOME) MAX_JOBS=$(MAX_JOBS) SRDIFF_SKIP_EXT=$(SRDIFF_SKIP_EXT) DEBUG=$(DEBUG)"
	@rm -f $(VENV)/.stamp-build-cuda*
	FORCE_CUDA=$* $(PIP) install -q --no-build-isolation --no-deps -e .
	@touch $@

install: $(VENV)/.stamp-build-cuda$(FORCE_CUDA)

# The main job on built-in data (scikit-learn's digits), CPU-sized. Outputs under runs/demo/; a run
# already there is moved aside to runs/demo.old-<time> (never deleted). DEMO_ARGS=--resume continues it.
# The demo needs no CUDA backend: from nothing it builds the CPU kernels alone.
DEMO_ARGS   ?= --overwrite
DEMO_BUILD  := $(VENV)/.stamp-build-cuda$(if $(wildcard $(VENV)/.stamp-build-cuda1),1,0)
MAKE_START  := $(shell date +%s)
demo: $(DEMO_BUILD)
	@$(PY) -m srdiff info
	$(PY) -m srdiff demo --config configs/demo.toml $(DEMO_ARGS)
	@s=$$(( $$(date +%s) - $(MAKE_START) )); echo "make demo: $$((s / 60)) min $$((s % 60)) s in all, set-up included"

# The paper's ablation on real MNIST with Inception FID (configs/ablation.toml): one shared base (the base
# curve's step-3000 checkpoint; `srdiff ablate --config configs/ablation.toml --base-curve` trains it),
# then 4 modes x 5 seeds, the 3 recipes and the sweeps, each run 1000 refinement steps + 1,000 Inception-scored
# samples: ~1,000 CPU-seconds per run on this 2-core CPU (docs/trainer.md, "The ablation"), hours in all.
# Resumable: finished runs are kept under docs/figures/ablation/mnist16_inception/runs/ and reused.
# One thread: the committed runs' count (CPU results are bit-identical only with the same thread count).
ABLATION_OUT := docs/figures/ablation/mnist16_inception
ablation: install
	OMP_NUM_THREADS=1 nice -n 5 $(PY) -m srdiff ablate --config configs/ablation.toml

# The ablation's tables and figures from its stored JSON, written into the README and docs/trainer.md.
ablation-report: install
	$(PY) -m srdiff ablate --report $(ABLATION_OUT)/ablation.json --into README.md docs/trainer.md
	for part in base_curve map_study costs; do \
	    $(PY) -m srdiff ablate --report $(ABLATION_OUT)/$$part.json --into docs/trainer.md || exit 1; done

# Every test. Triton kernels run in its CPU interpreter when no GPU is visible (tests/conftest.py).
test: install
	SRDIFF_REQUIRE_EXT=1 SRDIFF_REQUIRE_CUDA_BUILD=$(FORCE_CUDA) $(PY) -m pytest $(PYTEST_ARGS)

# The drift canary, not part of CI: a separate venv with the newest releases pyproject's ranges allow
# (re-resolved on every run), srdiff._C built there, then every test. Its last result: docs/install.md.
LATEST      ?= .venv-latest
LATEST_PY   := $(LATEST)/bin/python
latest-env:
	@test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST)
	$(LATEST_PY) -m pip install -q --no-compile $(TORCH_SPEC)
	FORCE_CUDA=$(FORCE_CUDA) $(LATEST_PY) -m pip install -q --no-compile --upgrade --upgrade-strategy eager \
	    --no-build-isolation -e ".[$(EXTRAS)]"
	@$(LATEST_PY) -m pip freeze --all --exclude-editable | grep -v '^pip==' > $(LATEST)/resolved.txt
	@echo "newest releases vs $(LOCK):"; diff <(grep -sv '^#' $(LOCK)) $(LATEST)/resolved.txt | grep '^[<>]' || echo "  (none differ)"
	@rm -f $(VENV)/.stamp-build-cuda*  # srdiff._C was rebuilt in place against this venv's torch

test-latest: latest-env
	SRDIFF_REQUIRE_EXT=1 SRDIFF_REQUIRE_CUDA_BUILD=$(FORCE_CUDA) $(LATEST_PY) -m pytest $(PYTEST_ARGS)

# The one command that changes the lock: the newest set (run `make test-latest` first; commit if it passed).
lock: latest-env
	@{ echo "# Generated by \`make lock\` on $$(date -u +%F) from pyproject.toml's extras [$(EXTRAS)] + $(TORCH_SPEC),"; \
	   echo "# Python $$($(LATEST_PY) -c 'import platform; print(platform.python_version())'), $$(uname -m). Do not edit by hand."; \
	   cat $(LATEST)/resolved.txt; } > $(LOCK)
	@echo "wrote $(LOCK): $$(grep -vc '^#' $(LOCK)) packages"

clean:
	rm -rf build dist *.egg-info srdiff/_C*.so .pytest_cache

# Every benchmark on the machine at hand -> benchmarks/results/<machine>/, then the README section.
bench: install
	PYTHONPATH=benchmarks $(PY) -m srdiff_bench.run $(BENCH_ARGS)
	PYTHONPATH=benchmarks $(PY) -m srdiff_bench.report

bench-report: install
	PYTHONPATH=benchmarks $(PY) -m srdiff_bench.report
