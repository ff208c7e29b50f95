#!/usr/bin/env python3
"""Open GGUF files written by `qlora-rt export-gguf` with gguf-py's own reader and check them.

For each file: gguf.GGUFReader parses it; the keys llama.cpp's loader needs for the file's architecture are present
with gguf-py's value types; every tensor llama.cpp expects for that architecture and block count is present, with
llama.cpp's names, no other tensor besides rope_freqs.weight, and every offset aligned; and every tensor dequantizes
with gguf.quants.dequantize to finite values. Prints one line per file and a summary of its keys and tensors.

    /tmp/ggufvenv/bin/python scripts/reference/gguf_export_check.py FILE.gguf...
"""

import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGUFValueType as V

COMMON = {
    "general.architecture": V.STRING, "general.name": V.STRING, "general.file_type": V.UINT32,
    "general.alignment": V.UINT32, "{a}.context_length": V.UINT32, "{a}.embedding_length": V.UINT32,
    "{a}.block_count": V.UINT32, "{a}.feed_forward_length": V.UINT32, "{a}.attention.head_count": V.UINT32,
    "{a}.attention.head_count_kv": V.UINT32, "{a}.attention.layer_norm_rms_epsilon": V.FLOAT32,
    "{a}.rope.freq_base": V.FLOAT32, "tokenizer.ggml.model": V.STRING, "tokenizer.ggml.tokens": V.ARRAY,
    "tokenizer.ggml.token_type": V.ARRAY, "tokenizer.ggml.bos_token_id": V.UINT32,
    "tokenizer.ggml.eos_token_id": V.UINT32, "tokenizer.ggml.add_bos_token": V.BOOL,
}
PER_ARCH = {
    "llama": {"{a}.rope.dimension_count": V.UINT32, "{a}.vocab_size": V.UINT32},
    "gemma": {"{a}.attention.key_length": V.UINT32, "{a}.attention.value_length": V.UINT32},
    "gemma2": {"{a}.attention.key_length": V.UINT32, "{a}.attention.sliding_window": V.UINT32,
               "{a}.attn_logit_softcapping": V.FLOAT32, "{a}.final_logit_softcapping": V.FLOAT32},
    "gemma3": {"{a}.attention.key_length": V.UINT32, "{a}.attention.sliding_window": V.UINT32},
}
LAYER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
SANDWICH = ["post_attention_norm", "post_ffw_norm"]


def check(path: str) -> None:
    r = GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    for key, vtype in {**COMMON, **PER_ARCH[arch]}.items():
        key = key.format(a=arch)
        assert key in r.fields, f"{path}: {key} missing"
        assert r.fields[key].types[0] == vtype, f"{path}: {key} is {r.fields[key].types}, expected {vtype}"
    n = r.fields[f"{arch}.block_count"].contents()
    kinds = LAYER + (SANDWICH if arch in ("gemma2", "gemma3") else []) + (
        ["attn_q_norm", "attn_k_norm"] if arch == "gemma3" else [])
    expected = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{k}.weight" for i in range(n) for k in kinds}
    names = {t.name for t in r.tensors}
    missing = expected - names
    extra = names - expected - {"output.weight", "rope_freqs.weight"}
    assert not missing and not extra, f"{path}: missing {sorted(missing)}, extra {sorted(extra)}"
    alignment = r.fields["general.alignment"].contents()
    for t in r.tensors:
        assert (t.data_offset - r.data_offset) % alignment == 0, f"{path}: {t.name} misaligned"
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(values).all(), f"{path}: {t.name} has non-finite values"
    types = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    print(f"OK {path}: GGUF v{r.fields['GGUF.version'].contents()}, {arch}, {len(r.fields)} fields, "
          f"{len(r.tensors)} tensors {dict(sorted(types.items()))}")
    print("   keys: " + ", ".join(k for k in r.fields if not k.startswith("GGUF.")))


def main() -> int:
    for path in sys.argv[1:]:
        check(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
