#!/usr/bin/env bash
# On a GPU machine (nvcc, sm_90a), from anywhere: builds the named standalone experiments of this folder and runs them
# one after the other in one command, so that their numbers share a device and each prints its own copy ceiling.
# Default: frag-gemv (tensor cores on a fragment-ordered copy) and rows-loop (the rows kernel's replica, its baseline).
# Each builds in seconds and runs in under a minute. kernels/NOTES.md "NF4 GEMV" says what each measured.
#   bash kernels/experiments/nf4-gemv/run.sh [NAME ...]
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)"
out="${TMPDIR:-/tmp}"
[ $# -gt 0 ] || set -- frag-gemv rows-loop
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader || true
for name in "$@"; do
    nvcc -O3 -std=c++17 -arch=sm_90a -o "$out/$name" "$dir/$name.cu"
    echo "== $name"
    "$out/$name"
done
