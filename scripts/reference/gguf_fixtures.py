#!/usr/bin/env python3
"""Write small GGUF files and their reference values for `models/tests/gguf_dequant.rs` and `cli/tests/import.rs`.

The oracle is llama.cpp's own Python package `gguf` (its GGUFWriter and its numpy quantizers and dequantizers), plus,
for tokenization, the `tokenizers` package and transformers' GGUF tokenizer conversion
(`transformers.integrations.gguf.gguf_tokenizer_mapping`, pure Python: PyTorch is not needed).

Usage (checked with gguf 0.19.0, numpy 2.4, tokenizers 0.23.3, transformers 5.23.0, safetensors 0.8.0):

    pip install gguf tokenizers transformers safetensors
    python3 scripts/reference/gguf_fixtures.py --out tests/fixtures/gguf

writes (about 500 KiB in all):

    quants.gguf                 one tensor `q.{TYPE}` of 4 rows x 256 columns per type: F32, F16, BF16, Q4_0, Q4_1,
                                Q5_0, Q5_1, Q8_0 (random data quantized by gguf.quants.quantize), Q2_K, Q3_K, Q4_K,
                                Q5_K, Q6_K (random valid blocks: gguf-py cannot quantize K-quants; random bytes are a
                                valid block once the f16 scales are finite, and the first block's scale is an f16
                                subnormal)
    quants_ref.safetensors      `q.{TYPE}` F32 [4, 256]: gguf.quants.dequantize of the stored bytes
    tiny_llama.gguf             a 2-layer Llama (hidden 32, 4 heads, 2 KV heads, MLP 64, untied lm_head) whose q/k
                                rows are permuted as convert_hf_to_gguf.py's `LlamaModel.permute` does, in Q8_0, Q4_1,
                                Q5_0, Q4_0, Q5_1, F16, BF16 and F32, with a byte-level BPE tokenizer trained here
                                (pre-tokenizer "gpt2") and a ChatML template
    tiny_llama_ref.safetensors  the Hugging Face tensors the import must produce, F32 (see below)
    tiny_gemma3.gguf            a 2-layer Gemma 3 (hidden 32, 2 heads of 48, 1 KV head, MLP 64, tied embeddings,
                                sliding window 16) with norms stored as w + 1 and a SentencePiece-style vocabulary
                                (byte tokens, a user-defined "\\n", a two-space token stored with real spaces)
    tiny_gemma3_ref.safetensors the Hugging Face tensors the import must produce, F32
    tokenizer_cases.json        {"tiny_llama": [{"text", "ids"}], "tiny_gemma3": [...]}: ids without special tokens
                                added, from the trained tokenizer (Llama) and from transformers' conversion of the
                                GGUF (Gemma 3, whose GGUF tokenizer has no other source)

The reference tensors never go through an inverse permutation: quantization works on blocks within a row, so it
commutes with a permutation of rows, and the reference is dequantize(quantize(W)) of the Hugging Face weight W itself,
while the GGUF stores quantize(permute(W)). Gemma norms are stored as float32(w + 1) and referenced as
float32(float32(w + 1) - 1), what subtracting 1 in f32 gives back.
"""

import importlib.metadata
import json
import os

import numpy as np

from fixture_cli import fail, fixture_args

QUANTIZED_BY_GGUF = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
# K-quant block layouts (ggml-common.h): byte offsets of the f16 scale fields.
K_QUANT_F16_FIELDS = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}

LLAMA_TEXTS = [
    "Hello world, hello tokens!",
    "The quick brown fox jumps over the lazy dog.",
    "<|im_start|>user\nhow are you?<|im_end|>\n",
    "  two leading spaces and 123 digits",
    "unseen: Zebra café ✓",
]
GEMMA_TEXTS = [
    "hello world hello",
    "the lazy dog  runs\nfast",
    "<start_of_turn>user\nhi<end_of_turn>\n",
    "byte fallback: Zq ✓ é",
]
CORPUS = [
    "hello world, hello tokens! the quick brown fox jumps over the lazy dog.",
    "how are you? i am fine, thank you. the dog runs fast and the fox runs faster.",
    "tokens are merged by byte pair encoding; digits 0123456789 stay apart.",
] * 20


def quant_fixture(gguf, out, rng):
    """quants.gguf + quants_ref.safetensors."""
    from safetensors.numpy import save_file

    qt = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(os.path.join(out, "quants.gguf"), "quants")
    refs = {}
    for name in QUANTIZED_BY_GGUF + list(K_QUANT_F16_FIELDS):
        t = qt[name]
        if name in QUANTIZED_BY_GGUF:
            x = rng.standard_normal((4, 256)).astype(np.float32) * np.float32(0.7)
            x[0, :32] = 0  # an all-zero block
            stored = gguf.quants.quantize(x, t)
        else:
            block, size = gguf.GGML_QUANT_SIZES[t]
            stored = rng.integers(0, 256, size=(4, 256 // block * size), dtype=np.uint8)
            blocks = stored.reshape(-1, size)
            for i, blk in enumerate(blocks):
                for at in K_QUANT_F16_FIELDS[name]:
                    # The first block's scale is an f16 subnormal (2^-20); the others normal, of either sign.
                    v = np.float16(2.0**-20) if i == 0 and at == K_QUANT_F16_FIELDS[name][0] else np.float16(rng.uniform(-0.05, 0.05))
                    blk[at : at + 2] = np.frombuffer(v.tobytes(), dtype=np.uint8)
        raw_dtype = None if name in ("F32", "F16") else t
        writer.add_tensor(f"q.{name}", stored, raw_dtype=raw_dtype)
        refs[f"q.{name}"] = gguf.quants.dequantize(stored, t).astype(np.float32).reshape(4, 256)
    write(writer)
    save_file(refs, os.path.join(out, "quants_ref.safetensors"), metadata={"generator": "scripts/reference/gguf_fixtures.py"})


def write(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def train_byte_level(tokenizers):
    tok = tokenizers.ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, vocab_size=320, min_frequency=2, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok


def tiny_llama(gguf, tokenizers, out, rng):
    from safetensors.numpy import save_file

    qt = gguf.GGMLQuantizationType
    tok = train_byte_level(tokenizers)
    model = json.loads(tok._tokenizer.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    hidden, heads, kv_heads, ffn, layers = 32, 4, 2, 64, 2
    hd = hidden // heads

    w = gguf.GGUFWriter(os.path.join(out, "tiny_llama.gguf"), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    ref = {}

    def add(gguf_name, hf_name, value, qtype, n_perm=None):
        """Store `value` (Hugging Face layout) as `qtype`, permuted for llama.cpp when n_perm is given."""
        value = value.astype(np.float32)
        stored_value = permute(value, n_perm) if n_perm else value
        if qtype == qt.F32:
            w.add_tensor(gguf_name, stored_value)
            ref[hf_name] = value
            return
        if qtype == qt.F16:
            w.add_tensor(gguf_name, stored_value.astype(np.float16))
            ref[hf_name] = value.astype(np.float16).astype(np.float32)
            return
        w.add_tensor(gguf_name, gguf.quants.quantize(stored_value, qtype), raw_dtype=qtype)
        # Blocks lie within rows, so quantization commutes with the row permutation.
        ref[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).reshape(value.shape)

    randn = lambda *shape: rng.standard_normal(shape).astype(np.float32) * np.float32(0.08)
    add("token_embd.weight", "model.embed_tokens.weight", randn(len(tokens), hidden), qt.Q8_0)
    for i in range(layers):
        p, h = f"blk.{i}", f"model.layers.{i}"
        add(f"{p}.attn_norm.weight", f"{h}.input_layernorm.weight", 1 + randn(hidden), qt.F32)
        add(f"{p}.attn_q.weight", f"{h}.self_attn.q_proj.weight", randn(heads * hd, hidden), qt.Q8_0, heads)
        add(f"{p}.attn_k.weight", f"{h}.self_attn.k_proj.weight", randn(kv_heads * hd, hidden), qt.Q4_1, kv_heads)
        add(f"{p}.attn_v.weight", f"{h}.self_attn.v_proj.weight", randn(kv_heads * hd, hidden), qt.Q5_0)
        add(f"{p}.attn_output.weight", f"{h}.self_attn.o_proj.weight", randn(hidden, heads * hd), qt.Q4_0)
        add(f"{p}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight", 1 + randn(hidden), qt.F32)
        add(f"{p}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", randn(ffn, hidden), qt.Q5_1)
        add(f"{p}.ffn_up.weight", f"{h}.mlp.up_proj.weight", randn(ffn, hidden), qt.F16)
        add(f"{p}.ffn_down.weight", f"{h}.mlp.down_proj.weight", randn(hidden, ffn), qt.BF16)
    add("output_norm.weight", "model.norm.weight", 1 + randn(hidden), qt.F32)
    add("output.weight", "lm_head.weight", randn(len(tokens), hidden), qt.Q8_0)
    write(w)
    save_file(ref, os.path.join(out, "tiny_llama_ref.safetensors"))
    cases = [{"text": t, "ids": tok.encode(t).ids} for t in LLAMA_TEXTS]
    oracle = gguf_oracle(gguf, os.path.join(out, "tiny_llama.gguf"), "llama")
    for case in cases:
        if oracle.encode(case["text"], add_special_tokens=False).ids != case["ids"]:
            fail(f"transformers' GGUF tokenizer and the trained one disagree on {case['text']!r}")
    return cases


def gguf_oracle(gguf, path, arch):
    """transformers' tokenizer for a GGUF file, built from its metadata as `from_pretrained(gguf_file=...)` does."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    renames = GGUF_TOKENIZER_MAPPING["tokenizer"].items()
    tok_dict = {name: meta[f"tokenizer.{k}"] for k, name in renames if f"tokenizer.{k}" in meta}
    return convert_gguf_tokenizer(arch, tok_dict)[0]


def tiny_gemma3(gguf, tokenizers, out, rng):
    from safetensors.numpy import save_file

    qt = gguf.GGMLQuantizationType
    spm = tokenizers.SentencePieceBPETokenizer(add_prefix_space=False)
    spm.train_from_iterator(CORPUS, vocab_size=200, min_frequency=2, special_tokens=[])
    learned = sorted(spm.get_vocab().items(), key=lambda kv: kv[1])
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokens = specials + ["\n", "  "] + [f"<0x{b:02X}>" for b in range(256)] + [t for t, _ in learned]
    types = [3] * len(specials) + [4, 1] + [6] * 256 + [1] * len(learned)
    hidden, heads, kv_heads, hd, ffn, layers = 32, 2, 1, 48, 64, 2
    path = os.path.join(out, "tiny_gemma3.gguf")

    w = gguf.GGUFWriter(path, "gemma3")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(16)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([-1000.0] * 8 + [0.0] * 256 + [-float(i) for i in range(len(learned))])
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    ref = {}

    def add(gguf_name, hf_name, value, qtype):
        value = value.astype(np.float32)
        if qtype == qt.F32:
            w.add_tensor(gguf_name, value)
            ref[hf_name] = value
        else:
            w.add_tensor(gguf_name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
            ref[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, qtype), qtype).reshape(value.shape)

    def add_norm(gguf_name, hf_name, n):
        """llama.cpp stores Gemma's norm weight w as w + 1."""
        wt = rng.standard_normal(n).astype(np.float32) * np.float32(0.1)
        stored = wt + np.float32(1)
        w.add_tensor(gguf_name, stored)
        ref[hf_name] = stored - np.float32(1)

    randn = lambda *shape: rng.standard_normal(shape).astype(np.float32) * np.float32(0.08)
    add("token_embd.weight", "model.embed_tokens.weight", randn(len(tokens), hidden), qt.Q8_0)
    for i in range(layers):
        p, h = f"blk.{i}", f"model.layers.{i}"
        add_norm(f"{p}.attn_norm.weight", f"{h}.input_layernorm.weight", hidden)
        add(f"{p}.attn_q.weight", f"{h}.self_attn.q_proj.weight", randn(heads * hd, hidden), qt.Q5_0)
        add(f"{p}.attn_k.weight", f"{h}.self_attn.k_proj.weight", randn(kv_heads * hd, hidden), qt.Q4_0)
        add(f"{p}.attn_v.weight", f"{h}.self_attn.v_proj.weight", randn(kv_heads * hd, hidden), qt.Q8_0)
        add_norm(f"{p}.attn_q_norm.weight", f"{h}.self_attn.q_norm.weight", hd)
        add_norm(f"{p}.attn_k_norm.weight", f"{h}.self_attn.k_norm.weight", hd)
        add(f"{p}.attn_output.weight", f"{h}.self_attn.o_proj.weight", randn(hidden, heads * hd), qt.Q5_1)
        add_norm(f"{p}.post_attention_norm.weight", f"{h}.post_attention_layernorm.weight", hidden)
        add_norm(f"{p}.ffn_norm.weight", f"{h}.pre_feedforward_layernorm.weight", hidden)
        add(f"{p}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", randn(ffn, hidden), qt.Q4_1)
        add(f"{p}.ffn_up.weight", f"{h}.mlp.up_proj.weight", randn(ffn, hidden), qt.Q4_1)
        add(f"{p}.ffn_down.weight", f"{h}.mlp.down_proj.weight", randn(hidden, ffn), qt.Q8_0)
        add_norm(f"{p}.post_ffw_norm.weight", f"{h}.post_feedforward_layernorm.weight", hidden)
    add_norm("output_norm.weight", "model.norm.weight", hidden)
    write(w)
    save_file(ref, os.path.join(out, "tiny_gemma3_ref.safetensors"))

    oracle = gguf_oracle(gguf, path, "gemma3")
    return [{"text": t, "ids": oracle.encode(t, add_special_tokens=False).ids} for t in GEMMA_TEXTS]


def main():
    args = fixture_args(__doc__, "tests/fixtures/gguf", 20250207)
    try:
        import gguf
        import tokenizers
        import transformers
        import safetensors
    except ImportError as e:
        fail(f"needs {e.name} (pip install gguf tokenizers transformers safetensors)")

    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    quant_fixture(gguf, args.out, rng)
    cases = {"tiny_llama": tiny_llama(gguf, tokenizers, args.out, rng), "tiny_gemma3": tiny_gemma3(gguf, tokenizers, args.out, rng)}
    with open(os.path.join(args.out, "tokenizer_cases.json"), "w") as f:
        json.dump(cases, f, indent=1, ensure_ascii=False)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in os.listdir(args.out))
    print(f"wrote {args.out}: {len(os.listdir(args.out))} files, {total / 1024:.0f} KiB")
    print(f"gguf {importlib.metadata.version('gguf')}, numpy {np.__version__}, tokenizers {tokenizers.__version__}, "
          f"transformers {transformers.__version__}, safetensors {safetensors.__version__}")


if __name__ == "__main__":
    main()
