#!/usr/bin/env python3
"""Compare qlora-rt's logits for an imported GGUF with transformers' own GGUF loader.

For each `--check GGUF OURS` pair: transformers loads the GGUF itself
(`AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, dequantized by the `gguf` package, f32, CPU) and runs
the id sequences stored in OURS, which
`qlora-rt import --gguf GGUF --out DIR --dtype f32` followed by
`cargo run --release --example dump_logits -- DIR OURS --ids ...` wrote (`ids.{i}`, `logits.{i}`). A check passes
when max |ours - transformers| <= --rtol * max |transformers| over every sequence. When `{stem}_ref.safetensors`
sits next to the GGUF (tests/fixtures/gguf), transformers' dequantized weights are compared with it too.

Usage (transformers 5.17, torch 2.11, gguf 0.19; accelerate is not needed):

    python3 scripts/reference/gguf_logits_check.py --check tests/fixtures/gguf/tiny_llama.gguf OURS.safetensors

Prints one `gguf_logits_check: PASS|FAIL|ERROR <name> ...` line per check; exits 1 unless all pass.

A real model too big to carry (SmolLM2-135M-Instruct Q4_1, 93 MB) can be cut to its first N decoder layers, every
kept tensor's bytes and every metadata key copied unchanged but `{arch}.block_count` (needs only gguf and numpy):

    python3 scripts/reference/gguf_logits_check.py --truncate SRC.gguf DST.gguf N
"""

import argparse
import datetime
import os
import sys
import traceback



def check(gguf_path, ours_path, rtol):
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    name = os.path.basename(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf_path)), gguf_file=name, dtype=torch.float32
    ).to("cpu").eval()

    weights = ""
    ref_path = gguf_path[: -len(".gguf")] + "_ref.safetensors"
    if os.path.exists(ref_path):
        ref_sd, sd = load_file(ref_path), model.state_dict()
        common = [k for k in ref_sd if k in sd]
        worst = max((sd[k].float() - ref_sd[k].float()).abs().max().item() for k in common)
        weights = f"; weights vs {os.path.basename(ref_path)}: {len(common)}/{len(ref_sd)} tensors, max diff {worst:.1e}"

    ours = load_file(ours_path)
    n = len([k for k in ours if k.startswith("ids.")])
    max_abs, max_ref, max_rel, tokens = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(n):
            ids = ours[f"ids.{i}"].to(torch.long)
            ref = model(input_ids=ids[None]).logits[0].float()
            got = ours[f"logits.{i}"].float()
            assert got.shape == ref.shape, (got.shape, ref.shape)
            d = (got - ref).abs()
            max_abs = max(max_abs, d.max().item())
            max_ref = max(max_ref, ref.abs().max().item())
            max_rel = max(max_rel, (d / ref.abs().clamp_min(1e-2)).max().item())
            tokens += len(ids)
    rel = max_abs / max_ref
    ok = rel <= rtol
    print(
        f"gguf_logits_check: {'PASS' if ok else 'FAIL'} {name} {datetime.date.today()} "
        f"torch {torch.__version__} transformers {transformers.__version__}: {n} sequences / {tokens} tokens x vocab "
        f"{ref.shape[-1]}: max abs diff {max_abs:.3e}, max |logit| {max_ref:.3e}, max abs diff / max |logit| "
        f"{rel:.3e} (rtol {rtol:g}), elementwise rel (|ref| floored at 1e-2) {max_rel:.3e}{weights}",
        flush=True,
    )
    return ok


def truncate(src, dst, layers):
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = layers if field.name == f"{arch}.block_count" else field.contents()
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < layers]
    for t in kept:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    print(f"wrote {dst}: {len(kept)} of {len(reader.tensors)} tensors, {layers} layers")


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--truncate":
        return truncate(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", nargs=2, action="append", metavar=("GGUF", "OURS"), required=True)
    ap.add_argument("--rtol", type=float, default=1e-3)
    args = ap.parse_args()
    try:
        import gguf

        print(f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else '?'} from {gguf.__file__}")
    except ImportError as e:
        print(f"gguf not importable: {e}")
    all_ok = True
    for gguf_path, ours_path in args.check:
        try:
            all_ok &= check(gguf_path, ours_path, args.rtol)
        except Exception as e:  # report why transformers refused, then go on with the next check
            all_ok = False
            print(f"gguf_logits_check: ERROR {os.path.basename(gguf_path)}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
