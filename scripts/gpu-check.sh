#!/usr/bin/env bash
# GPU checks, tier 3 of STYLE.md §12. Here (no GPU needed): builds in release mode qlora-kernels' test binaries and
# every workspace test target named cuda_* (the model step, the optimizer, training on the GPU), stages them with the
# kernel sources and a runner in .gpu/parity/ (git-ignored), and prints the one command to run on the GPU machine.
# There, from the repo root, .gpu/parity/run.sh runs every test in its own process (fixtures read from the repo's
# tests/fixtures) and prints a pass/fail table that says which tests ran on the GPU and which skipped (with
# QLORA_REQUIRE_GPU=1 set there, a skip is a failure).
#   scripts/gpu-check.sh [TARGET…]   only these test targets (e.g. cuda_nf4 cuda_step), when the whole set, with what
#                                    else a call carries, would pass the device tool's 64 MiB
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
stage=.gpu/parity

echo "gpu-check: building test binaries (cargo test --release --no-run --workspace)" >&2
json="$(cargo test --release --no-run --workspace --message-format=json)"
rm -rf "$stage"
mkdir -p "$stage/bin" "$stage/cuda"
# One line per test executable: "<target name> <path>".
python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg["profile"]["test"] or not msg.get("executable"):
        continue
    name, package = msg["target"]["name"], msg["package_id"]
    only = sys.argv[1:]
    if ("qlora-kernels" in package or name.startswith("cuda_")) and (not only or name in only):
        print(name, msg["executable"])
' "$@" <<<"$json" | while read -r name exe; do
    strip -o "$stage/bin/$name" "$exe"  # symbols are dead weight in the device tool's 64 MiB carry
done
cp kernels/cuda/*.cu kernels/cuda/*.cuh "$stage/cuda/"
# cli/tests/cuda_finetune.rs drives the binary itself (QLORA_RT_BIN there, as the built-in path is this machine's).
strip -o "$stage/qlora-rt" target/release/qlora-rt

cat >"$stage/run.sh" <<'RUNNER'
#!/usr/bin/env bash
# Runs on the GPU machine: each staged test binary, one test per process, then a table of the tests that ran on the
# GPU, skipped, or failed, and a summary per binary. Exits non-zero when any test failed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QLORA_REQUIRE_GPU=1
export QLORA_FIXTURES="$here/../../tests/fixtures"
export QLORA_RT_BIN="$here/qlora-rt"
export QLORA_KERNEL_CACHE_DIR="${TMPDIR:-/tmp}/qlora-rt-kernels"
if [[ -x /usr/local/cuda/bin/ptxas ]]; then export QLORA_PTXAS=/usr/local/cuda/bin/ptxas; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
logs="$(mktemp -d)"
rows=()
summary=()
failed=0
for bin in "$here"/bin/*; do
    name="$(basename "$bin")"
    pass=0 fail=0 on_gpu=0 skipped=0
    for test in $("$bin" --list --format terse 2>/dev/null | sed -n 's/: test$//p'); do
        # A test in a module (cuda_parity/<op>.rs) is listed as <op>::<name> but prints and is tabled by its name.
        short="${test##*::}"
        log="$logs/$name.$short.log"
        start=$(date +%s%N)
        "$bin" --exact "$test" --nocapture --test-threads=1 >"$log" 2>&1
        rc=$?
        ms=$((($(date +%s%N) - start) / 1000000))
        secs=$(printf '%d.%02d' $((ms / 1000)) $((ms % 1000 / 10)))
        where=cpu
        if grep -q "qlora-gpu: $short: ran on" "$log"; then where=gpu; on_gpu=$((on_gpu + 1)); fi
        if grep -q "qlora-gpu: $short: skipped" "$log"; then where=skipped; skipped=$((skipped + 1)); fi
        if [[ $rc -eq 0 ]]; then result=pass; pass=$((pass + 1)); else result=FAIL; fail=$((fail + 1)); failed=1; fi
        if [[ $where != cpu || $result != pass ]]; then
            rows+=("$(printf '%-4s  %-8s  %-14s  %-52s %6ss' "$result" "$where" "$name" "$short" "$secs")")
        fi
        if [[ $result == FAIL ]]; then
            echo "---- FAIL $name::$test (last 40 lines) ----"
            tail -n 40 "$log"
        fi
    done
    summary+=("$(printf '%-14s %4d passed, %d failed (%d on the GPU, %d skipped)' "$name" "$pass" "$fail" "$on_gpu" "$skipped")")
done
grep -h "qlora-gpu: .*: ran on" "$logs"/*.log | head -n 1 | sed 's/.*: ran on /device: /'
echo
printf '%-4s  %-8s  %-14s  %-52s %7s\n' result where binary test time
printf '%s\n' "${rows[@]}"
echo
printf '%s\n' "${summary[@]}"
# What the tests measured besides pass/fail (bandwidths against the device copy, memory peaks, per-family matches).
echo
echo "reports:"
grep -h "qlora-gpu: " "$logs"/*.log | grep -v -e ": ran on " -e ": skipped: " || true
exit $failed
RUNNER
chmod +x "$stage/run.sh"

# The whole suite (~63 MB) and the tracked tree no longer fit the device tool's 64 MiB carry; xz halves the binaries.
tar -C .gpu -cf - parity | xz -T0 -6 >.gpu/parity.tar.xz
echo "gpu-check: staged $(ls "$stage/bin" | wc -l) test binaries ($(du -sh "$stage" | cut -f1)) in $stage," \
    "$(du -sh .gpu/parity.tar.xz | cut -f1) as .gpu/parity.tar.xz:" >&2
ls "$stage/bin" >&2
echo "Run on the GPU machine (device tool, from the repo root; carry the archive, or the folder when it fits):" >&2
echo "  run  command=\"tar -C .gpu -xJf .gpu/parity.tar.xz && bash $stage/run.sh\"  carry=[\".gpu/parity.tar.xz\"]"
