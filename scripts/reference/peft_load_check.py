#!/usr/bin/env python3
"""Check that PEFT loads an adapter written by `qlora-rt finetune` unchanged and gives the logits qlora-rt gives.

The base model is loaded with transformers (f32, CPU), the adapter folder with `PeftModel.from_pretrained` exactly as
written; every tensor of `adapter_model.safetensors` must reappear in PEFT's adapter state dict with the same
values (no missing or unexpected keys), and the logits for each id sequence in OURS (written by
`cargo run --release --example dump_logits -- MODEL OURS --adapter ADAPTER --ids ...`: `ids.{i}`, `logits.{i}`) must
match within --atol. The logits of the base alone are printed too, to show the adapter changes them.

Usage (transformers 5.17, peft 0.21, torch 2.11):

    python3 scripts/reference/peft_load_check.py --model tests/fixtures/models/llama \
        --adapter tests/fixtures/peft_check/adapter --ours tests/fixtures/peft_check/ours_logits.safetensors

Prints one line starting with `peft_load_check: PASS` or `peft_load_check: FAIL`; exits 1 on FAIL.
"""

import argparse
import datetime
import sys

import torch
import transformers
import peft
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--ours", required=True)
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to("cpu").eval()
    ours = load_file(args.ours)
    n = len([k for k in ours if k.startswith("ids.")])
    seqs = [ours[f"ids.{i}"].to(torch.long) for i in range(n)]

    with torch.no_grad():
        base_logits = [base(input_ids=s[None]).logits[0] for s in seqs]
    model = PeftModel.from_pretrained(base, args.adapter).to("cpu").eval()

    # The adapter went in unchanged: same keys, same values.
    file_sd = load_file(f"{args.adapter}/adapter_model.safetensors")
    peft_sd = get_peft_model_state_dict(model)
    missing = sorted(set(file_sd) - set(peft_sd))
    unexpected = sorted(set(peft_sd) - set(file_sd))
    weight_diff = max((file_sd[k].float() - peft_sd[k].float()).abs().max().item() for k in file_sd if k in peft_sd)

    max_abs, max_rel, adapter_effect = 0.0, 0.0, 0.0
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = model(input_ids=s[None]).logits[0].float()
            got = ours[f"logits.{i}"].float()
            assert got.shape == ref.shape, (got.shape, ref.shape)
            d = (got - ref).abs()
            max_abs = max(max_abs, d.max().item())
            max_rel = max(max_rel, (d / ref.abs().clamp_min(1e-3)).max().item())
            adapter_effect = max(adapter_effect, (ref - base_logits[i]).abs().max().item())

    ok = not missing and not unexpected and weight_diff == 0.0 and max_abs <= args.atol and adapter_effect > 10 * args.atol
    tokens = sum(len(s) for s in seqs)
    print(
        f"peft_load_check: {'PASS' if ok else 'FAIL'} {datetime.date.today()} "
        f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}: "
        f"{len(file_sd)} adapter tensors loaded (missing {len(missing)}, unexpected {len(unexpected)}, "
        f"max weight diff {weight_diff:.1e}); {n} sequences / {tokens} tokens x vocab {seqs and ref.shape[-1]}: "
        f"logits max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e} (atol {args.atol:g}); "
        f"adapter moves the logits by up to {adapter_effect:.3e}"
    )
    if missing or unexpected:
        print(f"missing: {missing}\nunexpected: {unexpected}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
