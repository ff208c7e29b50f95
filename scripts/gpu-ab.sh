#!/usr/bin/env bash
# A change's GPU verdict in one device call: its GPU tests, then whole-step benches of the base revision's binary and
# this tree's, alternating in one command (timings from different commands or machines are not compared; the brief).
# Here: `scripts/gpu-check.sh TEST_TARGET…` stages this tree's tests and release binary in .gpu/parity/, and BASE's
# release binary is built in a temporary worktree and staged as .gpu/ab/base-qlora-rt with a runner. The base builds
# into target/ab-base, never target/: cargo fingerprints a workspace crate by its path relative to the workspace and
# its files' times, so a second checkout building into the same folder leaves artifacts that the first takes as fresh
# (a stale binary, silently). There, from the repo root:
#   bash .gpu/ab/run.sh [ROUNDS] "BENCH ARGS" ["BENCH ARGS"…]     e.g.  bash .gpu/ab/run.sh 2 "--shape llama-3.2-1b --steps 3"
# runs the tests (`.gpu/parity/run.sh`), then each bench ROUNDS times per binary (base, then this tree's), and prints
# per bench the step times of both and their ratio. A bench of kernels ("kernels --filter attention") prints per row
# the milliseconds of both and their ratio instead. JSON lines land in $OUT/ab.jsonl, the test log in
# $OUT/parity.txt.
#   scripts/gpu-ab.sh BASE [TEST_TARGET…]      BASE: any revision (main, a commit); targets: as gpu-check.sh takes them
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[[ $# -ge 1 ]] || { echo "usage: scripts/gpu-ab.sh BASE [TEST_TARGET…]" >&2; exit 2; }
base="$1"
shift
rev="$(git rev-parse --verify --quiet "$base^{commit}")" || { echo "gpu-ab: no revision $base" >&2; exit 2; }
stage=.gpu/ab

tree="$(mktemp -d)/base"
git worktree add --quiet --detach "$tree" "$rev"
trap 'git worktree remove --force "$tree"; rmdir "$(dirname "$tree")"' EXIT
echo "gpu-ab: building the base ($base = ${rev:0:10})" >&2
(cd "$tree" && CARGO_TARGET_DIR="$root/target/ab-base" cargo build --release -p qlora-rt --bin qlora-rt >&2)
rm -rf "$stage"
mkdir -p "$stage"
strip -o "$stage/base-qlora-rt" target/ab-base/release/qlora-rt
echo "${rev:0:10} $base" >"$stage/base-revision"
scripts/gpu-check.sh "$@" >/dev/null
if cmp -s "$stage/base-qlora-rt" .gpu/parity/qlora-rt; then
    echo "gpu-ab: the base and this tree build the same binary; nothing to compare" >&2
    exit 1
fi

cat >"$stage/run.sh" <<'RUNNER'
#!/usr/bin/env bash
# Runs on the GPU machine from the repo root: the staged tests, then base and head benches alternating (see
# scripts/gpu-ab.sh).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QLORA_KERNEL_CACHE_DIR="${TMPDIR:-/tmp}/qlora-rt-kernels"
out="${OUT:-/tmp}"
rounds=1
if [[ ${1:-} =~ ^[0-9]+$ ]]; then rounds=$1; shift; fi
bash "$here/../parity/run.sh" >"$out/parity.txt" 2>&1
echo "tests rc=$? at ${SECONDS}s (base $(cat "$here/base-revision"))"
grep -E "passed, .* failed|^FAIL" "$out/parity.txt"
for args in "$@"; do
    for ((round = 1; round <= rounds; round++)); do
        for side in base head; do
            bin="$here/base-qlora-rt"
            [[ $side == head ]] && bin="$here/../parity/qlora-rt"
            # A step bench prints one JSON line; a kernels bench one per row (the ceilings' included).
            # shellcheck disable=SC2086 # the bench's arguments are words on purpose
            timeout 150 "$bin" bench $args --json 2>>"$out/ab.err" | while read -r line; do
                [[ $line == \{* ]] || continue
                echo "{\"side\":\"$side\",\"args\":\"$args\",\"round\":$round,\"result\":$line}" >>"$out/ab.jsonl"
            done
        done
    done
done
python3 - "$out/ab.jsonl" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
def ratio(base, head):
    return f", head/base {statistics.median(head) / statistics.median(base):.3f}" if base and head else ""
for args in dict.fromkeys(r["args"] for r in rows):
    if args.split()[0] == "kernels":
        # ms per (row, shape); head/base < 1 is faster.
        kern = [r for r in rows if r["args"] == args and "ms" in r["result"]]
        for key in dict.fromkeys((r["result"]["name"], r["result"]["shape"]) for r in kern):
            ms = {side: [r["result"]["ms"] for r in kern if (r["result"]["name"], r["result"]["shape"]) == key and r["side"] == side]
                  for side in ("base", "head")}
            print(f"{key[0]} {key[1]}: base {ms['base']} ms, head {ms['head']} ms{ratio(ms['base'], ms['head'])}")
        continue
    ms = {side: [r["result"]["step_ms"] for r in rows if r["args"] == args and r["side"] == side and r["result"]]
          for side in ("base", "head")}
    gpu = next((r["result"].get("gpu") or r["result"].get("device") for r in rows if r["args"] == args and r["result"]), "?")
    print(f"{args}: base {ms['base']} ms, head {ms['head']} ms{ratio(ms['base'], ms['head'])} ({gpu})")
PY
RUNNER
chmod +x "$stage/run.sh"
echo "gpu-ab: staged $(du -shc .gpu/parity "$stage" | tail -1 | cut -f1) (plus the tracked tree)" >&2
echo "  run  command=\"bash $stage/run.sh 2 '--shape llama-3.2-1b --steps 3'\"  carry=[\".gpu/parity\", \"$stage\"]"
