#!/usr/bin/env bash
# On the GPU machine, from the repo root: where a decoding run's device time goes, per kernel, under Nsight Compute
# (one metric, gpu__time_duration). The profiler serializes launches, so overlapping launches do not overlap here: the
# sum bounds the device time from above. Prints per kernel and grid (the grid tells prefill's launches from a decoding
# step's, whose grids are small) the time, its share, the launches and the time per launch; the CSV stays in $OUT.
# With --tokens 2 the run is the prefill and one decoding step.
#   bash scripts/decode/kernel-times.sh BIN [bench decode args…]   e.g. BIN --shape llama-3-8b --prompt 512 --tokens 2
#   bash scripts/decode/kernel-times.sh FILE.csv                    summarize a CSV written before
set -uo pipefail
csv="${OUT:-/tmp}/decode_ncu.csv"
if [[ $1 == *.csv ]]; then
    csv=$1
else
    bin=$1
    shift
    export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
    "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv --print-summary per-kernel \
        "$bin" bench decode --warmup 0 --copy-reps 1 "$@" >"$csv" 2>"${csv%.csv}.err"
    echo "ncu rc=$?"
fi
python3 - "$csv" <<'PY'
import collections, csv, sys
rows = list(csv.reader(l for l in open(sys.argv[1]) if l.startswith('"')))
if not rows:
    sys.exit(f"{sys.argv[1]}: no profile rows")
ix = {h: i for i, h in enumerate(rows[0])}
time, count = collections.Counter(), collections.Counter()
for r in rows[1:]:
    if r[ix["Metric Name"]] != "gpu__time_duration.sum":
        continue
    name = f'{r[ix["Kernel Name"]].split("(")[0][:60]} {r[ix["Grid Size"]]}'
    n = int(r[ix["Invocations"]])
    # Nsight Compute 2025 writes "ns", "us", "ms"; older versions "nsecond", "usecond", "msecond".
    scale = {"n": 1e-3, "u": 1.0, "m": 1e3}[r[ix["Metric Unit"]][0]]
    time[name] += float(r[ix["Average"]].replace(",", "")) * n * scale
    count[name] += n
total = sum(time.values())
print(f"all kernels: {total / 1e3:.2f} ms over {sum(count.values())} launches")
for name, us in time.most_common(60):
    print(f"{us / 1e3:9.3f} ms {100 * us / total:5.1f} % {count[name]:6d}x {us / count[name]:9.2f} us  {name}")
PY
