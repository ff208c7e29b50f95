#!/usr/bin/env bash
# Stages the flash-attention variant run for the GPU machine in .gpu/flash/ (git-ignored): the variants library built
# here when an nvcc is at hand ($NVCC, or nvcc on PATH; the GPU machine then spends no device time compiling, else
# variants.py builds it there), and run.sh, which times the Hopper variants beside SDPA and profiles the backward
# variants under Nsight Compute. Prints the device command.
#   scripts/flash/gpu-stage.sh ["ONLY"]   ONLY: variants.py's --only filter for timing (default: bwd90|lazy)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
stage=.gpu/flash
rm -rf "$stage" && mkdir -p "$stage"
nvcc="${NVCC:-$(command -v nvcc || true)}"
if [[ -n "$nvcc" ]]; then
    inc="$(dirname "$(dirname "$nvcc")")"
    echo "flash-stage: building the variants library with $nvcc" >&2
    "$nvcc" -I"$inc/include" -L"$inc/lib" -O3 -std=c++17 -shared -Xcompiler -fPIC -gencode=arch=compute_90a,code=sm_90a \
        -lineinfo -o "$stage/flash_variants.so" scripts/flash/variants.cu
fi
only="${1:-bwd90|lazy}"
cat >"$stage/run.sh" <<RUNNER
#!/usr/bin/env bash
# Timing of the selected variants (one JSON line each: correctness, then ms, TFLOP/s and x SDPA), then Nsight Compute
# on every bwd90 variant at 4 x 2048 (the details page: throughput, pipe use, warp stall reasons).
cd "\$(dirname "\$0")/../.."
[[ -f .gpu/flash/flash_variants.so ]] && export FLASH_VARIANTS_SO=\$PWD/.gpu/flash/flash_variants.so
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
timeout 150 python3 scripts/flash/variants.py --only "$only" > \$OUT/time.jsonl 2> \$OUT/time.err
echo "timing rc=\$? failed checks: \$(grep -c '"ok": false' \$OUT/time.jsonl)"
timeout 70 ncu --clock-control none -k regex:bwd90_kernel --set full -o /tmp/bwd \\
    python3 scripts/flash/variants.py --only "bwd90 d" --once > /tmp/ncu.log 2>&1
echo "ncu rc=\$?"; tail -2 /tmp/ncu.log
ncu --import /tmp/bwd.ncu-rep --page details > \$OUT/ncu_bwd.txt 2>&1
RUNNER
chmod +x "$stage/run.sh"
echo "run on the GPU machine:  run command=\"bash $stage/run.sh\" carry=[\"$stage\"]"
