#!/usr/bin/env bash
# NVRTC and ptxas without a CUDA install: NVIDIA's PyPI wheels, in a cached virtualenv at the repo root (.venv-cuda/,
# git-ignored). Prints the exports that kernels/tests/nvrtc_compile.rs reads; everything else goes to stderr.
#
#   eval "$(scripts/cuda-tools.sh)"
#   QLORA_REQUIRE_CUDA_TOOLS=1 cargo test -p qlora-kernels --test nvrtc_compile -- --nocapture
#
# The versions match the GPU machines' CUDA 13.0 (driver 580). The wheels land in the venv's site-packages as
# nvidia/cu13/lib/libnvrtc.so.13 (+ libnvrtc-builtins.so.13.0 beside it) and nvidia/cu13/bin/ptxas. Only ptxas is
# used from nvidia-cuda-nvcc, so its dependencies (nvvm, crt, runtime: what nvcc itself needs) are not installed.
set -euo pipefail

NVRTC_VERSION=13.0.88
NVCC_VERSION=13.0.88

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-cuda"
stamp="$venv/.qlora-cuda-tools-$NVRTC_VERSION-$NVCC_VERSION"

if [[ ! -f "$stamp" ]]; then
    command -v python3 >/dev/null || { echo "cuda-tools: python3 is required (with venv and pip)" >&2; exit 1; }
    echo "cuda-tools: installing nvidia-cuda-nvrtc==$NVRTC_VERSION, nvidia-cuda-nvcc==$NVCC_VERSION into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
        "nvidia-cuda-nvrtc==$NVRTC_VERSION" "nvidia-cuda-nvcc==$NVCC_VERSION" >&2
    touch "$stamp"
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nvrtc="$site/nvidia/cu13/lib/libnvrtc.so.13"
ptxas="$site/nvidia/cu13/bin/ptxas"
for f in "$nvrtc" "$ptxas"; do
    [[ -e "$f" ]] || { echo "cuda-tools: $f is missing; delete $venv and run again" >&2; exit 1; }
done
echo "cuda-tools: $("$ptxas" --version | tail -1)" >&2
printf 'export QLORA_NVRTC_LIB=%q\n' "$nvrtc"
printf 'export QLORA_PTXAS=%q\n' "$ptxas"
