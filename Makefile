# The two commands a newcomer needs: `make demo` and `make test`. Each creates the
# virtual environment, installs torch and the rest, and builds the extension when needed.
PYTHON ?= python3
VENV ?= .venv
# A range would pull a multi-GB CUDA wheel; GPU users pass their own, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.ext-built
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/cpu/* csrc/cuda/*)
PYTEST_ARGS ?=

.PHONY: demo test test-slow lint bench cuda-check gpu-check gpu-check-dry info clean

$(DEPS): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet setuptools wheel ninja pybind11 numpy scipy tqdm \
		"triton>=3.2" "transformers>=4.46" "datasets>=2.18" safetensors pyyaml matplotlib \
		rouge-score scikit-learn "accelerate>=1.0" "peft>=0.13" "bitsandbytes>=0.50" \
		"pytest>=8" "pytest-benchmark>=4" "hypothesis>=6" "ruff>=0.6"
	touch $@

# --no-build-isolation: the extension must link against the torch installed above.
$(BUILT): $(DEPS) $(SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

demo: $(BUILT)
	$(VENV)/bin/zounlearn demo

info: $(BUILT)
	$(VENV)/bin/zounlearn info

# The default suite (about 14 minutes on 2 cores) leaves out the tests marked slow (the demo
# and a study end to end, long interpreter runs); `make test-slow` runs those, and CI runs
# both. pytest exits 5 when it collected no test; make treats that as the failure it is.
test: $(BUILT) lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(BUILT)
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The linter of pyproject.toml's [tool.ruff]: pyflakes, pycodestyle, import order.
lint: $(DEPS)
	$(VENV)/bin/ruff check .

bench: $(BUILT)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,rounds $(PYTEST_ARGS)

# Build and test against the CUDA build of torch (no GPU needed to compile).
cuda-check:
	bash scripts/cuda-check.sh

# On a GPU machine, offline, with the torch already there (no venv): build for the visible GPU,
# then every GPU stage in at most 8 minutes (docs/gpu-check.md). GPU_CHECK_OUT names the folder.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py

# The same stages at tiny sizes on the CPU (cpp backend, Triton's interpreter): CI's proof the script works.
gpu-check-dry: $(BUILT)
	$(PY) scripts/gpu_check.py --dry-run

clean:
	rm -rf build *.egg-info zounlearn/*.so $(VENV)
