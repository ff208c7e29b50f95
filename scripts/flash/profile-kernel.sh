#!/usr/bin/env bash
# On the GPU machine, from the repo root: Nsight Compute's full set on one launch of a kernel that `qlora-rt bench
# kernels` runs, with the SASS source page summarized per instruction (scripts/flash/source_profile.py). Writes the
# details page and the source CSV (gzipped) to $OUT.
#   bash scripts/flash/profile-kernel.sh BIN KERNEL_REGEX "BENCH FILTER"
#   e.g. bash scripts/flash/profile-kernel.sh .gpu/parity/qlora-rt 'flash_backward_sm90.*d128' 'attention fwd+bwd'
set -uo pipefail
bin=$1 kernel=$2 filter=$3
out="${OUT:-/tmp}"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
rep=$(mktemp -d)/kernel
# Three launches skipped: the bench's warm-up calls compile and cache the module first.
"$ncu" --clock-control none -k "regex:$kernel" --launch-skip 3 --launch-count 1 --set full --import-source yes -f \
    -o "$rep" "$bin" bench kernels --filter "$filter" >"$out/ncu.log" 2>&1
echo "ncu rc=$?"
"$ncu" -i "$rep.ncu-rep" --page details >"$out/ncu_details.txt" 2>&1
grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued|Registers Per|L2 Hit Rate|DRAM Throughput" "$out/ncu_details.txt"
"$ncu" -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.csv" 2>"$out/ncu_source.err"
gzip -c "$rep.csv" >"$out/ncu_source.csv.gz"
python3 "$(dirname "$0")/source_profile.py" "$rep.csv"
