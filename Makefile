# The contract with new users: `make demo` and `make test` set everything up from nothing.
# Both are idempotent: stamp files in .venv make a second run skip the setup it already did.

PYTHON      ?= $(shell command -v python3.11 || command -v python3)
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
CUDA_HOME   ?= /usr/local/cuda
# Build the CUDA backend of srdiff._C whenever nvcc is there, GPU or not (CI compiles it too).
FORCE_CUDA  ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)
TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
MAX_JOBS    ?= 2
PYTEST_ARGS ?=
export CUDA_HOME FORCE_CUDA TORCH_CUDA_ARCH_LIST MAX_JOBS

EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py srdiff/_sources.py

.PHONY: all install demo test bench bench-report clean

all: test

$(VENV)/.stamp-deps: requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -r requirements-dev.txt
	@touch $@

$(VENV)/.stamp-build: $(VENV)/.stamp-deps $(EXT_SOURCES) pyproject.toml
	@echo "building srdiff._C: FORCE_CUDA=$(FORCE_CUDA) TORCH_CUDA_ARCH_LIST='$(TORCH_CUDA_ARCH_LIST)' CUDA_HOME=$(CUDA_HOME) MAX_JOBS=$(MAX_JOBS) SRDIFF_SKIP_EXT=$(SRDIFF_SKIP_EXT) DEBUG=$(DEBUG)"
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

install: $(VENV)/.stamp-build

# The main job on built-in data (scikit-learn's digits), CPU-sized. Outputs under runs/demo/; a run
# already there is moved aside to runs/demo.old-<time> (never deleted). DEMO_ARGS=--resume continues it.
DEMO_ARGS   ?= --overwrite
demo: install
	$(PY) -m srdiff info
	$(PY) -m srdiff demo --config configs/demo.toml $(DEMO_ARGS)

# The paper's ablation on real MNIST with Inception FID: 4 modes x 5 seeds, the 3 recipes, the lam_f /
# lam_r / ratio / cycle sweeps (configs/ablation.toml). Long on a 2-core CPU (docs/trainer.md: about
# 12 hours estimated, mostly the Inception network); resumable: rerun `make ablation` and finished runs are reused.
# Results (JSON, markdown tables, PNGs) go to docs/figures/ablation/mnist16_inception/.
ablation: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(PY) -m srdiff ablate --config configs/ablation.toml

# Every test. Triton kernels run in its CPU interpreter when no GPU is visible (tests/conftest.py).
test: install
	SRDIFF_REQUIRE_EXT=1 SRDIFF_REQUIRE_CUDA_BUILD=$(FORCE_CUDA) $(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf build *.egg-info srdiff/_C*.so .pytest_cache

# Every benchmark on the machine at hand -> benchmarks/results/<machine>/, then the README section.
bench: install
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.report

bench-report: install
	$(PY) -m benchmarks.report
