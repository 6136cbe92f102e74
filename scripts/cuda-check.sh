#!/usr/bin/env bash
# `make cuda-check`: build and import the whole package against the CUDA build of torch
# (what most users install), then run the op tests with that build. Needs nvcc, not a GPU.
# The build happens in a copy of the tree ($VENV/src) so that its extensions never
# overwrite the ones the CPU virtual environment built in place.
set -euo pipefail

VENV=${VENV_CUDA:-.venv-cuda}
bash scripts/cuda-venv.sh "$VENV"
# shellcheck disable=SC1091
source "$VENV/cuda-env.sh"

SRC="$VENV/src"
mkdir -p "$SRC"
# Tracked and new files only; tar keeps mtimes, so ninja rebuilds only what changed.
git ls-files --cached --others --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$SRC"

cd "$SRC"
ZOUNLEARN_FORCE_CUDA=1 python -m pip install -qq --no-build-isolation --no-deps -e .
python - <<'PY'
import torch
import zounlearn._C_cpu, zounlearn._C_cuda  # both extensions built and loadable
from zounlearn.ops import backends
print(f"cuda-check: torch {torch.__version__}, zounlearn._C_cuda built; backends:")
for name, why in backends.status().items():
    print(f"  {name:<10} {why or 'available'}")
PY
# Without a GPU the ops run on the CPU backends and Triton's interpreter under this torch.
python -m pytest -q -p no:cacheprovider tests/test_rng.py tests/test_perturb.py tests/test_validation.py \
    tests/test_triton_kernels.py tests/test_cuda_compile.py tests/test_update_ops.py tests/test_optim.py
