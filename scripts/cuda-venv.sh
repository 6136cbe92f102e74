#!/usr/bin/env bash
# Create a venv holding the CUDA 13.0 build of torch 2.14.1, and write $VENV/cuda-env.sh,
# the environment that torch.utils.cpp_extension needs to compile a CUDA extension against
# it on a machine without a GPU. Idempotent: a finished venv carries a stamp and is kept.
#   usage: scripts/cuda-venv.sh [VENV]   (default .venv-cuda), then: source VENV/cuda-env.sh
set -euo pipefail

VENV=${1:-.venv-cuda}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PACKAGES="$TORCH_SPEC numpy scipy pytest ninja pybind11 setuptools wheel"
# The stamp names the package list, so a changed list re-runs the install.
STAMP="$VENV/.cuda-venv-$(echo "$PACKAGES" | md5sum | cut -c1-8)"

[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "cuda-venv: no nvcc under CUDA_HOME=$CUDA_HOME" >&2; exit 1; }

# What the finished venv takes (5.7 GB measured, mostly nvidia-* libraries), with a margin.
NEED_GB=${CUDA_VENV_NEED_GB:-6}

if [ ! -f "$STAMP" ]; then
    mkdir -p "$VENV"
    free_kb=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
    if awk -v f="$free_kb" -v n="$NEED_GB" 'BEGIN {exit !(f < n * 1024 * 1024)}'; then
        printf 'cuda-venv: %s holds %.1f GB free but the CUDA build of torch needs ~%s GB;\n' \
            "$(df -P "$VENV" | awk 'NR == 2 {print $6}')" "$(awk -v f="$free_kb" 'BEGIN {print f / 1048576}')" "$NEED_GB" >&2
        echo "cuda-venv: free some space (e.g. make clean, or rm -rf .venv) or set VENV_CUDA to a bigger disk" >&2
        exit 1
    fi
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    # pip's config (find-links + file:// extra indexes) holds the 0.5 GB torch wheel and its
    # ~3 GB of nvidia-*/triton wheels; for an equal version pip takes the local file, so only
    # small pure-Python/newer deps (cuda-bindings, nvjitlink, ...) come from PyPI.
    # torch pins triton (~=3.8) itself. -qq hides the flood of "Location ... is ignored"
    # warnings the file:// indexes print for projects they lack; errors still show.
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip install -qq --no-cache-dir $PACKAGES
    "$VENV/bin/python" - <<'EOF'
import torch, triton
assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
print(f"cuda-venv: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
EOF
    touch "$STAMP"
fi

VENV_ABS=$(cd "$VENV" && pwd)
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# CUDA_HOME's toolkit ships nvcc, cudart and CCCL headers but not the library headers that
# torch's own headers include (ATen/cuda/CUDAContext.h -> cublas_v2.h, cusparse.h,
# cusolverDn.h, ...). The nvidia-* wheels of CUDA 13 put all of them in one shared folder,
# site-packages/nvidia/cu13/include; nvcc and g++ both read CPATH. It goes *after* CUDA_HOME's
# own include dir (which the compile line names with -I) so the toolkit's copies win.
NV_INC="$SITE/nvidia/cu13/include"
[ -f "$NV_INC/cublas_v2.h" ] || { echo "cuda-venv: no cublas_v2.h in $NV_INC" >&2; exit 1; }

cat > "$VENV/cuda-env.sh" <<EOF
# source me: builds torch CUDA extensions against $VENV_ABS without a GPU
export CUDA_HOME="$CUDA_HOME"
export PATH="$CUDA_HOME/bin:$VENV_ABS/bin:\$PATH"
export CPATH="$NV_INC\${CPATH:+:\$CPATH}"
# No GPU to query, so name the targets (A100, H100); cpp_extension reads this.
export TORCH_CUDA_ARCH_LIST="\${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="\${MAX_JOBS:-2}"
EOF
echo "cuda-venv: ready; run: source $VENV/cuda-env.sh"
