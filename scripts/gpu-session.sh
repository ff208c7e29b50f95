#!/usr/bin/env bash
# One GPU call's worth of checks and measurements, staged here (no GPU needed) for the device tool: the GPU tests of
# the given targets (scripts/gpu-check.sh), the flash-attention variants with Nsight Compute (scripts/flash/
# gpu-stage.sh), the cuBLASLt autotune probe when it was built (scripts/gemm/README.md), and whole-step benches.
# Everything fits one carry (the device tool takes 64 MiB; the script says the size) and one call of up to 10 minutes,
# the most important first; results land as at most 8 files in $OUT.
#   scripts/gpu-session.sh [TEST_TARGET…]    default targets: the GPU tests most recently changed
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(cuda_nf4 cuda_fused_ops cuda_generate cuda_step cuda_bench cuda_scratch_ops cuda_flash_attention cuda_nccl cuda_nccl_finetune cuda_finetune)
scripts/gpu-check.sh "${targets[@]}" >/dev/null
scripts/flash/gpu-stage.sh >/dev/null
carry='".gpu/parity", ".gpu/flash"'
[[ -x .gpu/gemm/autotune_probe ]] && carry+=', ".gpu/gemm"'

cat >.gpu/session.sh <<'RUNNER'
#!/usr/bin/env bash
# Runs on the GPU machine from the repo root, in order of importance, each part under its own time limit.
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
timeout 180 bash .gpu/parity/run.sh >"$OUT/parity.txt" 2>&1
echo "parity rc=$?"; grep -E "passed, .* failed" "$OUT/parity.txt"
timeout 200 bash .gpu/flash/run.sh
if [[ -x .gpu/gemm/autotune_probe ]]; then timeout 45 .gpu/gemm/autotune_probe >"$OUT/gemm.txt" 2>&1; echo "gemm rc=$?"; fi
for shape in "llama-3.2-1b" "llama-3.2-1b --dora" "llama-3.2-1b --memory-budget lean" "llama-3-8b --memory-budget 40"; do
    timeout 40 .gpu/parity/qlora-rt bench --shape $shape --steps 4 --json >>"$OUT/bench.jsonl" 2>>"$OUT/bench.err"
    echo "bench $shape rc=$?"
done
RUNNER
chmod +x .gpu/session.sh
echo "gpu-session: staged $(du -shc .gpu/parity .gpu/flash $( [[ -d .gpu/gemm ]] && echo .gpu/gemm ) | tail -1 | cut -f1) (plus the tracked tree)" >&2
echo "  run  command=\"bash .gpu/session.sh\"  carry=[$carry, \".gpu/session.sh\"]"
