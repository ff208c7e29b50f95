#!/usr/bin/env bash
# A change's GPU verdict in one device call: its GPU tests, then whole-step or kernel benches of the base revision's
# binary, this tree's and any other revisions', rotating in one command (timings from different commands or machines
# are not compared; the brief). Here: `scripts/gpu-check.sh TEST_TARGET…` stages this tree's tests and release binary
# in .gpu/parity/; BASE's release binary and each variant's (NAME=REV: a branch or commit to weigh beside this tree,
# with its own build of the same test targets) are built in temporary worktrees and packed, compressed, into
# .gpu/ab/sides.tar.xz with a runner. Each builds into target/ab-NAME (the base into target/ab-base), never target/:
# cargo fingerprints a workspace crate by its path relative to the workspace and its files' times, so a second
# checkout building into the same folder leaves artifacts that the first takes as fresh (a stale binary, silently);
# kept folders make the next run incremental. There, from the repo root:
#   bash .gpu/ab/run.sh [ROUNDS] "BENCH ARGS" ["BENCH ARGS"…]     e.g.  bash .gpu/ab/run.sh 2 "--shape llama-3.2-1b --steps 3"
#   (AB_DEADLINE=S in its environment: no bench starts after S seconds, so a call near its limit still summarizes;
#   AB_TESTS_LAST=1: this tree's tests after the benches, not before)
# runs this tree's tests (`.gpu/parity/run.sh`) and each variant's, then each bench ROUNDS times per side (base,
# head, the variants; reversed every other round), and prints per bench the step times of every side and their
# ratio to the base. A bench of kernels ("kernels --filter attention") prints per row the milliseconds and ratios
# instead. JSON lines land in $OUT/ab.jsonl, the test logs in $OUT/parity.txt and $OUT/tests-NAME.txt.
#   scripts/gpu-ab.sh BASE [NAME=REV…] [TEST_TARGET…]    BASE, REV: any revision (main, a commit); targets: as
#                                                         gpu-check.sh takes them
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[[ $# -ge 1 ]] || { echo "usage: scripts/gpu-ab.sh BASE [NAME=REV…] [TEST_TARGET…]" >&2; exit 2; }
base="$1"
shift
variants=()
targets=()
for arg in "$@"; do
    if [[ $arg == *=* ]]; then variants+=("$arg"); else targets+=("$arg"); fi
done
stage=.gpu/ab
sides="$stage/sides"
rm -rf "$stage"
mkdir -p "$sides"

trees=()
cleanup() {
    for tree in "${trees[@]}"; do
        git worktree remove --force "$tree" 2>/dev/null || true
        rm -rf "$(dirname "$tree")"
    done
}
trap cleanup EXIT

# build NAME REV: NAME's release binary and the named test targets, stripped into $sides/NAME.
build() {
    local name=$1 rev tree
    rev="$(git rev-parse --verify --quiet "$2^{commit}")" || { echo "gpu-ab: no revision $2" >&2; exit 2; }
    tree="$(mktemp -d)/$name"
    trees+=("$tree")
    git worktree add --quiet --detach "$tree" "$rev"
    echo "gpu-ab: building $name ($2 = ${rev:0:10})" >&2
    mkdir -p "$sides/$name/tests"
    (
        cd "$tree"
        export CARGO_TARGET_DIR="$root/target/ab-$name"
        cargo build --release -p qlora-rt --bin qlora-rt >&2
        if [[ $name != base && ${#targets[@]} -gt 0 ]]; then
            # Only the named test targets: the whole workspace's took minutes more per variant.
            local only=()
            for target in "${targets[@]}"; do only+=(--test "$target"); done
            cargo test --release --no-run --workspace "${only[@]}" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg["profile"]["test"] and msg.get("executable") \
            and msg["target"]["name"] in sys.argv[1:]:
        print(msg["target"]["name"], msg["executable"])
' "${targets[@]}"
        fi
    ) | while read -r target exe; do strip -o "$sides/$name/tests/$target" "$exe"; done
    strip -o "$sides/$name/qlora-rt" "$root/target/ab-$name/release/qlora-rt"
    echo "${rev:0:10} $2" >"$sides/$name/revision"
}

build base "$base"
for v in "${variants[@]}"; do
    build "${v%%=*}" "${v#*=}"
done
scripts/gpu-check.sh "${targets[@]}" >/dev/null
# With variants, a tree equal to the base is a second base (a measure of the rounds' noise).
if [[ ${#variants[@]} -eq 0 ]] && cmp -s "$sides/base/qlora-rt" .gpu/parity/qlora-rt; then
    echo "gpu-ab: the base and this tree build the same binary; nothing to compare" >&2
    exit 1
fi
# The device tool carries 64 MiB in all: the binaries travel compressed (about a fifth of their size).
tar -cJf "$stage/sides.tar.xz" -C "$stage" sides
rm -rf "$sides"

cat >"$stage/run.sh" <<'RUNNER'
#!/usr/bin/env bash
# Runs on the GPU machine from the repo root: the staged tests, then the sides' benches rotating (see
# scripts/gpu-ab.sh).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QLORA_KERNEL_CACHE_DIR="${TMPDIR:-/tmp}/qlora-rt-kernels"
out="${OUT:-/tmp}"
unpacked="$(mktemp -d)"
tar -xJf "$here/sides.tar.xz" -C "$unpacked"
rounds=1
if [[ ${1:-} =~ ^[0-9]+$ ]]; then rounds=$1; shift; fi
# This tree's staged tests; with AB_TESTS_LAST=1 after the benches instead (where device time is short, the
# comparison comes back even if the call is cut off in the suite).
tree_tests() {
    bash "$here/../parity/run.sh" >"$out/parity.txt" 2>&1
    echo "tests rc=$? at ${SECONDS}s (base $(cat "$unpacked/sides/base/revision"))"
    grep -E "passed, .* failed|^FAIL" "$out/parity.txt"
}
[[ ${AB_TESTS_LAST:-0} == 1 ]] || tree_tests
order=(base head)
for dir in "$unpacked"/sides/*/; do
    name="$(basename "$dir")"
    [[ $name == base ]] && continue
    order+=("$name")
    for test in "$dir"tests/*; do
        [[ -e $test ]] || continue
        QLORA_REQUIRE_GPU=1 QLORA_FIXTURES="$here/../../tests/fixtures" QLORA_RT_BIN="$dir/qlora-rt" \
            "$test" --test-threads=1 >>"$out/tests-$name.txt" 2>&1
        rc=$?
        echo "$name $(basename "$test") rc=$rc at ${SECONDS}s ($(cat "$dir/revision")): $(grep -h "test result" "$out/tests-$name.txt" | tail -1)"
    done
done
touch "$out/ab.jsonl"
for args in "$@"; do
    for ((round = 1; round <= rounds; round++)); do
        sides=("${order[@]}")
        if ((round % 2 == 0)); then mapfile -t sides < <(printf '%s\n' "${order[@]}" | tac); fi
        for side in "${sides[@]}"; do
            # A call is cut off at its limit with nothing summarized: AB_DEADLINE (seconds into the run) skips the
            # benches that would start after it, so the summary still prints.
            if [[ -n ${AB_DEADLINE:-} ]] && ((SECONDS > AB_DEADLINE)); then
                echo "skipped past AB_DEADLINE=${AB_DEADLINE}s: $side round $round, $args"
                continue
            fi
            bin="$unpacked/sides/$side/qlora-rt"
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
python3 - "$out/ab.jsonl" "${order[@]}" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
order = sys.argv[2:]
def sides(values):
    """Each side's samples in ms and, after the base, the ratio of its median to the base's (< 1: faster)."""
    base = values.get("base")
    parts = []
    for side in order:
        ms = values.get(side, [])
        ratio = f" ({statistics.median(ms) / statistics.median(base):.3f})" if base and ms and side != "base" else ""
        parts.append(f"{side} {ms}{ratio}")
    return ", ".join(parts)
for args in dict.fromkeys(r["args"] for r in rows):
    if args.split()[0] == "kernels":
        kern = [r for r in rows if r["args"] == args and "ms" in r["result"]]
        for key in dict.fromkeys((r["result"]["name"], r["result"]["shape"]) for r in kern):
            values = {}
            for r in kern:
                if (r["result"]["name"], r["result"]["shape"]) == key:
                    values.setdefault(r["side"], []).append(r["result"]["ms"])
            print(f"{key[0]} {key[1]} ms: {sides(values)}")
        continue
    values, device = {}, {}
    for r in rows:
        if r["args"] == args and r["result"]:
            # A training step's ms, or a decoding step's (`bench decode`), and for decoding its device ms too (the
            # kernels' time without the host's gaps, the steadier of the two).
            values.setdefault(r["side"], []).append(r["result"].get("step_ms", r["result"].get("decode_ms")))
            if "decode_device_ms" in r["result"]:
                device.setdefault(r["side"], []).append(r["result"]["decode_device_ms"])
    gpu = next((r["result"].get("gpu") or r["result"].get("device") for r in rows if r["args"] == args and r["result"]), "?")
    print(f"{args} step ms: {sides(values)} ({gpu})")
    if device:
        print(f"{args} device ms: {sides(device)}")
PY
if [[ ${AB_TESTS_LAST:-0} == 1 ]]; then tree_tests; fi
RUNNER
chmod +x "$stage/run.sh"
echo "gpu-ab: staged $(du -shc .gpu/parity "$stage" | tail -1 | cut -f1) (plus the tracked tree)" >&2
echo "  run  command=\"bash $stage/run.sh 2 '--shape llama-3.2-1b --steps 3'\"  carry=[\".gpu/parity\", \"$stage\"]"
