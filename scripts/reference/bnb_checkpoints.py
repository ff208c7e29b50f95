#!/usr/bin/env python3
"""Saves tiny fixtures as transformers + bitsandbytes save a 4-bit NF4 model: the files `qlora-rt quantize` must
reproduce byte for byte (cli/tests/quantize.rs).

For tests/fixtures/models/{llama,gemma3}, with and without double quantization: `from_pretrained` with
BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=<dq>,
bnb_4bit_compute_dtype=torch.float32) on CUDA, then `save_pretrained` into {out}/{family}-{dq|nodq}/, keeping only
config.json and model.safetensors. Prints what the files hold (header metadata, tensor order, a quant-state JSON)
and writes the versions used to {out}/versions.json.

--check DIR... loads each given folder (named {family}-{dq|nodq}, e.g. written by `qlora-rt quantize`) with
transformers and prints how far its logits are from those of the reference saved here, on the fixture's input ids.

Run (needs CUDA and bitsandbytes):
  python3 scripts/reference/bnb_checkpoints.py --models tests/fixtures/models --out tests/fixtures/bnb
"""
import argparse
import json
import os
import struct

import torch
import transformers
from safetensors import safe_open

FAMILIES = {"llama": transformers.LlamaForCausalLM, "gemma3": transformers.Gemma3ForCausalLM}
KEEP = {"config.json", "model.safetensors"}


def load(path, cls, double_quant=None):
    """Quantizes a dense folder on load, or (double_quant None) loads a 4-bit folder as saved."""
    kwargs = dict(dtype=torch.float32, attn_implementation="eager", device_map={"": 0})
    if double_quant is not None:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=torch.float32)
    return cls.from_pretrained(path, **kwargs).eval()


def describe(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    names = [k for k in header if k != "__metadata__"]
    print(f"  header: {n} bytes, metadata {header.get('__metadata__')}, {len(names)} tensors")
    print(f"  order: {[(k, header[k]['dtype']) for k in names[:8]]} ...")
    with safe_open(path, "pt") as f:
        for k in names:
            if k.endswith("quant_state.bitsandbytes__nf4"):
                print(f"  {k}: {bytes(f.get_tensor(k).tolist()).decode()}")
                break


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.cuda()).logits[0].float().cpu()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True, help="folder of the dense fixtures (tiny_models.py's --out)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--check", nargs="*", default=[], help="4-bit folders to compare with the references")
    args = ap.parse_args()
    import bitsandbytes
    import safetensors

    for family, cls in FAMILIES.items():
        for dq in (True, False):
            d = os.path.join(args.out, f"{family}-{'dq' if dq else 'nodq'}")
            os.makedirs(d, exist_ok=True)
            load(os.path.join(args.models, family), cls, dq).save_pretrained(d)
            for name in os.listdir(d):
                if name not in KEEP:
                    os.remove(os.path.join(d, name))
            print(d)
            describe(os.path.join(d, "model.safetensors"))

    for d in args.check:
        name = os.path.basename(os.path.normpath(d))
        family = name.rsplit("-", 1)[0]
        with safe_open(os.path.join(args.models, family, "reference.safetensors"), "pt") as f:
            ids = f.get_tensor("input_ids").long()[None]
        ours = logits(load(d, FAMILIES[family]), ids)
        ref = logits(load(os.path.join(args.out, name), FAMILIES[family]), ids)
        print(f"check {name}: max |logits(ours) - logits(reference)| = {(ours - ref).abs().max().item():.3e}")

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "bitsandbytes": bitsandbytes.__version__, "safetensors": safetensors.__version__}
    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)
    print(versions)


if __name__ == "__main__":
    main()
