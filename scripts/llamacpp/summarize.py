#!/usr/bin/env python3
"""Prints run_checks.sh's results as Markdown tables: per model, one row per GGUF file with llama.cpp's load
warnings, tokenization and detokenization against the original file, the mean NLL of the fixed text in llama.cpp,
its difference from qlora-rt's NLL of the same ids on the folder the file was exported from, the difference in
perplexity from llama-quantize's file of the same type (with the tensors whose bytes differ), and whether the
greedy continuation matches qlora-rt's.

    python3 scripts/llamacpp/summarize.py WORK_DIR
"""

import json
import math
import sys
from pathlib import Path


def main() -> None:
    work = Path(sys.argv[1])
    for m in ("smollm2", "gemma3"):
        d = work / m
        # split("\n"), not splitlines(): JSON.stringify leaves U+2028 and friends unescaped in greedy text.
        rows = [json.loads(line) for line in (d / "llamacpp.jsonl").read_text().split("\n") if line]
        ours = {"hf": json.loads((d / "eval-hf.json").read_text())["loss"],
                "merged": json.loads((d / "eval-merged.json").read_text())["loss"]}
        generated = {v: (d / f"generate-{v}.txt").read_text().strip() for v in ("hf", "merged")}
        by_name = {Path(r["file"]).name: r for r in rows}
        print(f"\n### {m}: {len(rows[0]['ids'])} scored ids; qlora-rt NLL {ours['hf']:.5f} (plain), "
              f"{ours['merged']:.5f} (adapter merged)\n")
        print("| file | load warnings | tokens = original | detok = original | NLL (llama.cpp) | Δ vs qlora-rt "
              "| Δ ppl vs llama-quantize | tensors byte-equal | greedy = qlora-rt |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            name = Path(r["file"]).name
            source = "merged" if "-lora-" in name else "hf"
            original = r is rows[0]
            delta = "" if original else f"{r['nll'] - ours[source]:+.5f}"
            lq, equal = "", ""
            if not original and not name.endswith(".llama-quantize.gguf"):
                theirs = by_name.get(name.replace(".gguf", ".llama-quantize.gguf"))
                if theirs:
                    lq = f"{(math.exp(r['nll'] - theirs['nll']) - 1) * 100:+.3f}%"
                cmp = d / name.replace(".gguf", ".compare.json")
                if cmp.exists():
                    c = json.loads(cmp.read_text())
                    equal = "whole file" if c["identical_files"] else f"{c['same_bytes']}/{c['tensors']}"
                    if c["type_differs"] or c["bytes_differ"]:
                        equal += f" (differ: {', '.join((c['type_differs'] + c['bytes_differ'])[:3])})"
            text = r["greedy_text"].strip()
            same = "" if original else ("yes" if generated[source].startswith(text[:60]) else f"no: {text[:40]!r}")
            warnings = "; ".join(r["load_warnings"]) or "none"
            print(f"| {name} | {warnings} | {r['same_tokens']} | {r['round_trip']} | {r['nll']:.5f} | {delta} "
                  f"| {lq} | {equal} | {same} |")


if __name__ == "__main__":
    main()
