"""Peer of `qlora-rt bench decode`: transformers + bitsandbytes generate on the GPU, timed the same way.

The model is a random initialisation of a qlora-rt built-in shape (its config read from models/shapes/SHAPE.json, so
the two run the same architecture), saved in bf16 to /tmp/ckpt-decode-SHAPE once (the GPU machine has no model hub),
then loaded 4-bit: NF4, double quantization, bf16 compute, SDPA attention, as ../shared/bench/hf_qlora_baseline.py
loads its models. With --lora, a peft LoRA r = alpha = 16 on all seven projections, unmerged. Each sequence of
--batch gets --prompt random ids; greedy `generate` makes exactly --tokens new tokens (min_new_tokens =
max_new_tokens), the default dynamic KV cache, no torch.compile. A streamer stamps the time (after a device sync) of
every token as generate emits it: the first new token ends the prefill, each later one a decode step.

Prints one JSON line whose fields mean what `qlora-rt bench decode --json`'s of the same name mean: prefill_ms,
prefill_tokens_per_s, decode_ms (median wall time of a decode step), decode_ms_p90 (nearest rank, as qlora-rt's
bench/stats.rs), decode_tokens_per_s (× batch), weight_bytes (what a decode step reads: every parameter as held,
4-bit weights as packed bytes plus their scales, the lm_head or tied embedding table whole, one embedding row per
sequence), weight_gbps, copy_gbps (a 1 GiB device-to-device copy, bytes read + written, as `bench kernels`),
weight_of_copy, kv_bytes_per_step, peak_gib. decode_device_ms is null: generate gives no per-step device time.

Usage (on the GPU machine, bitsandbytes installed from .whl/ as ../shared/bench/README.md says):
  python3 scripts/decode/hf_generate.py llama-3-8b [--batch 1] [--prompt 512] [--tokens 128] [--lora] [--out FILE]
"""
import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COPY_BYTES = 1 << 30


def shape_config(shape):
    """The transformers config of a qlora-rt built-in shape (the file qlora_models::synthetic parses)."""
    from transformers import AutoConfig
    path = os.path.join(ROOT, "models", "shapes", shape + ".json")
    if not os.path.exists(path):
        known = sorted(f[:-5] for f in os.listdir(os.path.dirname(path)) if f.endswith(".json"))
        raise SystemExit(f"hf_generate: unknown shape {shape!r} (known: {', '.join(known)})")
    with open(path) as f:
        d = json.load(f)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def build(shape, path):
    """A random bf16 checkpoint of the shape at path (built on the GPU, as hf_qlora_baseline.py builds its own)."""
    from transformers import AutoModelForCausalLM
    cfg = shape_config(shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True)
    del model
    torch.cuda.empty_cache()


def stamps():
    """A generate streamer that records when each put arrives, after the device has finished the step."""
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    return Stamps()


def percentile(samples, q):
    """Nearest rank, as qlora-rt's bench/stats.rs: the smallest sample with at least a fraction q at or below it."""
    s = sorted(samples)
    rank = min(max(math.ceil(q * len(s)), 1), len(s))
    return s[rank - 1]


def copy_gbps(reps):
    """GB/s of a 1 GiB device-to-device copy (read + written), the median of reps after two untimed."""
    src = torch.full((COPY_BYTES,), 0xA5, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 2:
            times.append(a.elapsed_time(b))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / statistics.median(times) / 1e6


def tensor_bytes(t):
    return t.numel() * t.element_size()


def weight_bytes(model, batch):
    """Bytes a decode step reads: every parameter once (4-bit ones as packed bytes plus absmax, and the nested
    absmax of double quantization), except the input embedding table, of which one row per sequence; a table tied
    to the lm_head is read whole as the lm_head."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += tensor_bytes(p)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += tensor_bytes(qs.absmax)
            nested = getattr(qs, "state2", None)
            if nested is not None:
                total += tensor_bytes(nested.absmax)
    table = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    rows = batch * table.shape[1] * table.element_size()
    return total - (0 if head is table else tensor_bytes(table)) + rows


def kv_bytes_per_step(cfg, batch, prompt, tokens, elem_bytes):
    """Keys and values the decode steps' attention reads, on average per step (a sliding layer only its window)."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    row = 2 * cfg.num_key_value_heads * head_dim * elem_bytes
    kinds = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    steps = tokens - 1
    total = 0
    for i in range(1, steps + 1):
        keys = prompt + i
        total += sum(min(keys, window) if k == "sliding_attention" and window else keys for k in kinds)
    return batch * row * total // steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", help="a qlora-rt built-in shape: llama-3-8b, llama-3.2-1b, ...")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1, help="untimed generations before the timed one")
    ap.add_argument("--lora", action="store_true", help="peft LoRA r = alpha = 16 on all seven projections")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--copy-reps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=None, help="also append the JSON line to FILE")
    a = ap.parse_args()
    if a.batch < 1 or a.prompt < 1 or a.tokens < 2:
        raise SystemExit("hf_generate: --batch and --prompt must be at least 1, --tokens at least 2")
    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = os.path.join(tempfile.gettempdir(), "ckpt-decode-" + a.shape)
    if not os.path.exists(os.path.join(path, "config.json")):
        t0 = time.time()
        build(a.shape, path)
        print(f"built {a.shape} in {time.time() - t0:.0f}s", flush=True)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa")
    versions = dict(torch=torch.__version__, transformers=transformers.__version__,
                    bitsandbytes=bitsandbytes.__version__)
    if a.lora:
        import peft
        lcfg = peft.LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                               target_modules=PROJECTIONS)
        model = peft.get_peft_model(model, lcfg)
        versions["peft"] = peft.__version__
    model.eval()
    build_s = time.time() - t0
    cfg = model.config
    positions = a.prompt + a.tokens - 1
    if positions > cfg.max_position_embeddings:
        raise SystemExit(f"hf_generate: --prompt {a.prompt} and --tokens {a.tokens} need {positions} positions; "
                         f"the model's context is {cfg.max_position_embeddings}")

    gen = torch.Generator(device="cuda").manual_seed(a.seed)

    def generation():
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt), device="cuda", generator=gen)
        stamper = stamps()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                 max_new_tokens=a.tokens, min_new_tokens=a.tokens, use_cache=True,
                                 pad_token_id=cfg.eos_token_id, streamer=stamper)
        new = out.shape[1] - a.prompt
        if new != a.tokens:
            raise SystemExit(f"hf_generate: generate made {new} tokens, not {a.tokens}")
        # generate puts the prompt first, then each new token; the last --tokens stamps are the new tokens'.
        times = stamper.times
        token_times = times[-a.tokens:]
        if len(token_times) != a.tokens:
            raise SystemExit(f"hf_generate: the streamer saw {len(times)} puts for {a.tokens} tokens")
        prefill_start = times[0] if len(times) == a.tokens + 1 else start
        steps = [(t1 - t0) * 1e3 for t0, t1 in zip(token_times, token_times[1:])]
        return (token_times[0] - prefill_start) * 1e3, steps

    for _ in range(a.warmup):
        generation()
    torch.cuda.reset_peak_memory_stats()
    prefill_ms, steps = generation()
    peak = torch.cuda.max_memory_allocated()
    copy = copy_gbps(a.copy_reps)

    decode_ms = statistics.median(steps)
    weights = weight_bytes(model, a.batch)
    weight_gbps = weights / decode_ms / 1e6
    res = dict(
        peer="hf-transformers-bnb",
        subject=a.shape,
        device="cuda:0",
        gpu=torch.cuda.get_device_name(),
        dtype="bf16",
        batch=a.batch,
        prompt=a.prompt,
        tokens=a.tokens,
        warmup=a.warmup,
        quantize="nf4",
        double_quant=True,
        adapter=a.lora,
        r=a.r if a.lora else None,
        target_modules=PROJECTIONS if a.lora else None,
        dora=False,
        merged=False,
        build_s=round(build_s, 2),
        prefill_ms=round(prefill_ms, 3),
        prefill_tokens_per_s=round(a.batch * a.prompt / prefill_ms * 1e3, 1),
        decode_steps=len(steps),
        decode_ms=round(decode_ms, 3),
        decode_ms_p90=round(percentile(steps, 0.9), 3),
        decode_device_ms=None,
        decode_tokens_per_s=round(a.batch / decode_ms * 1e3, 1),
        weight_bytes=weights,
        weight_gbps=round(weight_gbps, 1),
        copy_gbps=round(copy, 1),
        weight_of_copy=round(weight_gbps / copy, 3),
        kv_bytes_per_step=kv_bytes_per_step(cfg, a.batch, a.prompt, a.tokens, 2),
        peak_gib=round(peak / 2**30, 6),
        versions=versions,
    )
    print(json.dumps(res), flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
