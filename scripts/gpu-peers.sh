#!/usr/bin/env bash
# qlora-rt beside Unsloth and HF peft + bnb in one command on the GPU machine (issue #12's and #13's measurement).
# Here: builds the release binary (stripped), copies ../shared/bench and writes a runner into .gpu/peer/ (git-ignored),
# downloads the peers' wheels into .whl/ once (bitsandbytes trimmed to its CUDA 13 libraries, Unsloth without its
# studio/), and prints the one command to run there. There, `bash .gpu/peer/run.sh SHAPE...` runs per shape, in order,
# each job under the time left of a 10-minute call: build the random checkpoint, Unsloth, qlora-rt, `qlora-rt bench` on
# the same checkpoint, qlora-rt with `--memory-budget lean`, and HF when PEERS_HF=1. PEERS_FINAL=1 runs issue #12's
# comparison instead: Unsloth (twice for the 1B), qlora-rt by default, HF, and qlora-rt within the issue's memory.
# Every result is one JSON line in $OUT/peers.jsonl (printed at the end), the jobs' logs go to $OUT/logs.txt: the
# device tool brings back at most 8 files.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
stage=.gpu/peer
bench="${QLORA_PEER_BENCH:-$root/../shared/bench}"
[[ -f "$bench/qlora_rt_bench.py" ]] || { echo "gpu-peers: no peer scripts in $bench (set QLORA_PEER_BENCH)" >&2; exit 1; }

echo "gpu-peers: building the release binary" >&2
cargo build --release -p qlora-rt --bin qlora-rt >&2
rm -rf "$stage"
mkdir -p "$stage"
cp -r "$bench" "$stage/bench"
cp target/release/qlora-rt "$stage/qlora-rt"
strip "$stage/qlora-rt"

if [[ ! -d .whl ]]; then
    echo "gpu-peers: downloading the peers' wheels into .whl/" >&2
    mkdir -p .whl
    platforms=()
    for p in manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
        platforms+=(--platform "${p}_x86_64")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d .whl \
        bitsandbytes==0.50.2 unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 'datasets<5' torchao \
        cut_cross_entropy tyro docstring-parser typeguard shtab dill multiprocess msgspec pydantic==2.14.4 \
        pydantic-core==2.50.5 annotated-types typing-inspection json5 nest-asyncio structlog >&2
    # The device tool carries 64 MiB in all: keep bitsandbytes' CPU and CUDA 13 libraries, drop Unsloth's studio/.
    tmp="$(mktemp -d)"
    (cd "$tmp" && unzip -q "$root"/.whl/bitsandbytes-*.whl && find . -name 'libbitsandbytes_*.so' \
        | grep -v -e _cpu -e _cuda130 -e _cuda132 | xargs rm -f && rm "$root"/.whl/bitsandbytes-*.whl \
        && zip -qr "$root/.whl/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl" .)
    rm -rf "$tmp" && tmp="$(mktemp -d)"
    (cd "$tmp" && unzip -q "$root"/.whl/unsloth-2026.10.9-*.whl && rm -rf studio && rm "$root"/.whl/unsloth-2026.10.9-*.whl \
        && zip -qr "$root/.whl/unsloth-2026.10.9-py3-none-any.whl" .)
    rm -rf "$tmp"
fi

cat >"$stage/run.sh" <<'RUNNER'
#!/usr/bin/env bash
# Runs on the GPU machine from the repo root: bash .gpu/peer/run.sh SHAPE... (llama-1b, llama-8b, gemma2-2b).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
t0=$(date +%s)
budget=${PEERS_SECONDS:-570}
left() { echo $((budget - ($(date +%s) - t0))); }
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export QLORA_KERNEL_CACHE_DIR=/tmp/qlora-rt-kernels PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
out="${OUT:-/tmp}"; res="$out/peers.jsonl"; logs="$out/logs.txt"
b="$here/bench"; bin="$here/qlora-rt"
# A job runs when at least half its allowance is left, and never past the budget.
job() {
    local name=$1 allowance=$2 t
    shift 2
    t=$(left)
    if ((t < allowance / 2)); then echo "skip $name: ${t}s left"; return; fi
    ((allowance > t)) && allowance=$t
    echo "== $name" >>"$logs"
    timeout "$allowance" "$@" >>"$logs" 2>&1
    echo "$name rc=$? at $(($(date +%s) - t0))s"
}
# PEERS_FINAL's memory bound per shape: the peak issue #12 measured on 2026-12-04, in GiB (Gemma's 15.2 binds nothing).
declare -A peak=([llama-1b]=5.5 [llama-8b]=11.8)
for shape in "$@"; do
    unsloth_env=()
    # Unsloth's torch.compile fails at step 0 on Gemma 2 here (../shared/bench/README.md).
    [[ $shape == gemma2-* ]] && unsloth_env=(UNSLOTH_COMPILE_DISABLE=1)
    job "prepare $shape" 240 python3 "$b/unsloth_qlora_baseline.py" --prepare "$shape"
    job "unsloth $shape" 240 env "${unsloth_env[@]}" python3 "$b/unsloth_qlora_baseline.py" "$shape" 4 2048 --out "$res"
    job "qlora-rt $shape" 90 python3 "$b/qlora_rt_bench.py" "$bin" "$shape" 4 2048 --out "$res"
    if [[ ${PEERS_FINAL:-0} == 1 ]]; then
        # Issue #12's command: HF, qlora-rt within the peak it measured on 2026-12-04 (the issue's memory bound), and
        # Unsloth's 1B a second time (its rate moves ~13 % run to run; the README takes the best of two).
        job "hf $shape" 240 python3 "$b/hf_qlora_baseline.py" "$shape" 4 2048 --out "$res"
        [[ -n ${peak[$shape]:-} ]] && job "qlora-rt budget $shape" 90 python3 "$b/qlora_rt_bench.py" "$bin" "$shape" 4 2048 \
            --out "$res" -- --memory-budget "${peak[$shape]}"
        [[ $shape == llama-1b ]] && job "unsloth $shape again" 240 python3 "$b/unsloth_qlora_baseline.py" "$shape" 4 2048 --out "$res"
        continue
    fi
    # finetune's own step on the same checkpoint, timed by `bench` (CUDA events, no loop around it): beside the line
    # above it says whether a gap to `bench --shape` is the checkpoint or finetune's loop.
    job "qlora-rt bench $shape" 90 bash -c "\"$bin\" bench --model /tmp/ckpt-$shape --batch 4 --seq 2048 --dropout 0 \
        --steps 5 --warmup 3 --json | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); r[\"peer\"]=\"qlora-rt bench\"; r[\"shape\"]=\"$shape\"; print(json.dumps(r))' >>\"$res\""
    job "qlora-rt lean $shape" 120 python3 "$b/qlora_rt_bench.py" "$bin" "$shape" 4 2048 --out "$res" -- --memory-budget lean
    if [[ ${PEERS_HF:-0} == 1 ]]; then
        job "hf $shape" 200 python3 "$b/hf_qlora_baseline.py" "$shape" 4 2048 --out "$res"
    fi
done
python3 - "$res" <<'PY'
import json, sys
keys = ("peer", "shape", "extra", "tokens_per_s", "step_ms", "peak_gib", "smi_peak_gib", "ok", "stage", "error")
for line in open(sys.argv[1]):
    r = json.loads(line)
    print({k: r[k] if k != "error" else str(r[k])[-300:] for k in keys if r.get(k) is not None})
PY
RUNNER
chmod +x "$stage/run.sh"

echo "gpu-peers: staged $(du -sh "$stage" | cut -f1) in $stage, wheels $(du -sh .whl | cut -f1) in .whl" >&2
echo "Run on the GPU machine (device tool, from the repo root):" >&2
echo "  run  command=\"bash $stage/run.sh llama-1b gemma2-2b\"  carry=[\"$stage\", \".whl\"]" >&2
