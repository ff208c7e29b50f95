#!/usr/bin/env python3
"""Dump bitsandbytes' NF4 quantization of small tensors as fixtures for `tests/nf4_bitsandbytes.rs`.

The oracle is bitsandbytes' CUDA kernels (`quantize_4bit` / `dequantize_4bit` / `quantize_blockwise` on a CUDA
tensor): that is what writes real QLoRA checkpoints. Its pure-PyTorch CPU fallback differs (an all-zero block gets
code 7 instead of 0; a partial last block is divided by its absmax, not multiplied by the reciprocal), so this script
refuses to run without CUDA.

Usage (on a machine with a CUDA GPU, torch and bitsandbytes; checked with torch 2.11 + bitsandbytes 0.50.2):

    python3 scripts/reference/nf4_fixtures.py --out tests/fixtures/nf4

writes `nf4_bnb.safetensors` (well under 1 MB). Tensor names, for each case `{case}`:

    {case}.input            F32 [rows, cols]   the weight, widened to f32 (exact for bf16/f16 inputs)
    {case}.blocksize        I32 [1]
    {case}.packed           U8  [(n+1)//2, 1]  bnb's packed nibbles
    {case}.quant_map        F32 [16]           quant_state.code (the NF4 table)
    {case}.dequant          F32 [rows, cols]   dequantize_4bit with the output dtype forced to f32
    {case}.dequant_native   BF16/F16           dequantize_4bit in the input's dtype (16-bit inputs only)
  without double quantization:
    {case}.absmax           F32 [nb]
  with double quantization (compress_statistics=True):
    {case}.absmax           U8  [nb]           quantized absmax (what checkpoints store as weight.absmax)
    {case}.absmax_raw       F32 [nb]           the f32 absmax before double quantization (same input, DQ off)
    {case}.nested_absmax    F32 [ceil(nb/256)] state2.absmax
    {case}.nested_offset    F32 [1]            the offset (mean of absmax_raw, torch.mean on the GPU)
    {case}.nested_code      F32 [256]          state2.code (the signed dynamic map)
    {case}.absmax_dequant   F32 [nb]           dequantize_blockwise(absmax, state2) + offset, as dequantize_4bit does

Cases named `blockwise8_*` exercise bnb's 8-bit blockwise quantizer alone (the nested step) with the dynamic map:

    {case}.input F32 [n], {case}.blocksize I32 [1], {case}.quantized U8 [n], {case}.absmax F32 [ceil(n/bs)],
    {case}.dequant F32 [n]

Global tensors: `dynamic_map_signed`, `dynamic_map_unsigned` (F32 [256], `create_dynamic_map(signed=...)`).
The safetensors metadata records versions, the device, the seed, and per case `{case}.dtype` and `{case}.note`;
`{case}.reciprocal_sensitive = "true"` marks cases whose values sit within an ulp of a rounding threshold after
scaling, where bnb's approximate reciprocal (MUFU.RCP: its CUDA code is built with --use_fast_math) decides the code.
"""

import copy
import os
import sys
import zlib

from fixture_cli import fail, fixture_args, fixture_meta, require

# (name, shape, dtype, blocksize, double_quant, kind). Names are stable: each case is seeded from its own name, so
# adding a case never changes another. kinds: see make_input.
CASES = [
    ("f32_96x96_b64", (96, 96), "float32", 64, False, "randn"),
    ("f32_96x96_b64_dq", (96, 96), "float32", 64, True, "randn"),
    ("bf16_96x96_b64", (96, 96), "bfloat16", 64, False, "randn"),
    ("bf16_96x96_b64_dq", (96, 96), "bfloat16", 64, True, "randn"),
    ("f32_33x64_b128", (33, 64), "float32", 128, False, "randn"),
    ("f32_33x64_b128_dq", (33, 64), "float32", 128, True, "randn"),
    ("bf16_33x64_b64_dq", (33, 64), "bfloat16", 64, True, "randn"),
    ("f16_33x64_b64_dq", (33, 64), "float16", 64, True, "randn"),
    ("f32_7x40_b64", (7, 40), "float32", 64, False, "randn"),
    ("f32_7x40_b64_dq", (7, 40), "float32", 64, True, "randn"),
    ("bf16_7x40_b128", (7, 40), "bfloat16", 128, False, "randn"),
    ("f32_7x33_b64_odd", (7, 33), "float32", 64, False, "randn"),
    ("f32_7x33_b64_odd_dq", (7, 33), "float32", 64, True, "randn"),
    ("bf16_5x13_b32_odd", (5, 13), "bfloat16", 32, False, "randn"),
    ("f32_96x96_b32", (96, 96), "float32", 32, False, "randn"),
    ("bf16_33x64_b32_dq", (33, 64), "bfloat16", 32, True, "randn"),
    ("f32_50x50_b512_dq", (50, 50), "float32", 512, True, "randn"),
    ("f32_64x100_b4096", (64, 100), "float32", 4096, False, "randn"),
    ("f32_1x40_b64_dq_single_block", (1, 40), "float32", 64, True, "randn"),
    ("f32_136x128_b64_dq_rowscale", (136, 128), "float32", 64, True, "rowscale"),
    ("f32_5x43_b64_zero_blocks", (5, 43), "float32", 64, False, "zero_blocks"),
    ("f32_5x43_b64_zero_blocks_dq", (5, 43), "float32", 64, True, "zero_blocks"),
    ("f32_4x64_b64_ties", (4, 64), "float32", 64, False, "ties"),
    ("f32_48x64_b64_edges", (48, 64), "float32", 64, False, "edges"),
    ("f32_4x64_b64_subnormal", (4, 64), "float32", 64, False, "subnormal"),
    ("f32_4x64_b64_subnormal_dq", (4, 64), "float32", 64, True, "subnormal"),
    ("f32_2x32_b32_codes", (2, 32), "float32", 32, False, "codes"),
]

# Kinds whose values are placed on rounding thresholds of a block with a non-power-of-two absmax: the code then depends
# on the last bit of 1/absmax, which bnb computes with MUFU.RCP (approximate; IEEE for ~87 % of mantissas).
RECIPROCAL_SENSITIVE = {"edges"}

# (name, n, blocksize, kind) for bnb's 8-bit blockwise quantizer with the signed dynamic map.
BLOCKWISE8_CASES = [
    ("blockwise8_midpoints_b256", 1024, 256, "midpoints"),
    ("blockwise8_randn_b256", 700, 256, "randn"),
    ("blockwise8_edges_b256", 2048, 256, "edges"),
]


def main():
    args = fixture_args(__doc__, "tests/fixtures/nf4", 20240521, seed_help="base seed; each case adds crc32(name)")

    torch = require("torch", "PyTorch (pip install torch) on a machine with a CUDA GPU")
    try:
        import bitsandbytes
        import bitsandbytes.functional as F
    except Exception as e:  # bnb raises various errors when its native library is missing
        fail(f"cannot import bitsandbytes ({type(e).__name__}: {e}); pip install bitsandbytes")
    save_file = require("safetensors.torch", "the safetensors package (pip install safetensors)").save_file
    if not torch.cuda.is_available():
        fail(
            "no CUDA device visible to PyTorch. These fixtures must come from bitsandbytes' CUDA kernels: its CPU "
            "fallback quantizes all-zero blocks and partial last blocks differently. Run this on a GPU machine."
        )

    dev = torch.device("cuda")
    # Probe: the CUDA kernel turns an all-zero block into code 0 (0 * (1/0) = NaN fails every comparison); the
    # pure-PyTorch fallback clamps absmax and gives code 7. Anything but 0x00 means bnb is not running its CUDA kernel.
    try:
        probe, _ = F.quantize_4bit(torch.zeros(64, device=dev), blocksize=64, quant_type="nf4")
    except Exception as e:
        fail(
            f"bitsandbytes {bitsandbytes.__version__} could not quantize on CUDA ({type(e).__name__}: {e}). "
            "Its CUDA library is probably missing or does not match this CUDA runtime; "
            "`python -m bitsandbytes` diagnoses it."
        )
    probe_bytes = sorted(set(probe.flatten().tolist()))
    if probe_bytes != [0]:
        fail(
            f"bitsandbytes quantized an all-zero block to bytes {probe_bytes}, not [0]: it is not running its CUDA "
            "kernel (CPU/PyTorch fallback?). Check `python -m bitsandbytes`."
        )

    tensors = {}
    meta = fixture_meta(
        "nf4",
        args.seed,
        torch,
        bitsandbytes=bitsandbytes.__version__,
        device=torch.cuda.get_device_name(dev),
        cuda=str(torch.version.cuda),
    )

    tensors["dynamic_map_signed"] = F.create_dynamic_map(signed=True).float().cpu().contiguous()
    tensors["dynamic_map_unsigned"] = F.create_dynamic_map(signed=False).float().cpu().contiguous()

    nf4 = nf4_table(F)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    skipped = []
    for name, shape, dtype_name, blocksize, dq, kind in CASES:
        gen = torch.Generator().manual_seed(args.seed + zlib.crc32(name.encode()))
        x32, note = make_input(torch, kind, shape, gen, nf4)
        dtype = dtypes[dtype_name]
        w = x32.to(dtype)
        try:
            case = quantize_case(torch, F, w.to(dev), blocksize, dq)
        except Exception as e:
            # Blocksize 32 needs a warp-32 GPU and bnb >= 0.46; record and go on rather than lose the other cases.
            skipped.append(f"{name} ({type(e).__name__}: {e})")
            continue
        tensors[f"{name}.input"] = w.float().contiguous()
        tensors[f"{name}.blocksize"] = torch.tensor([blocksize], dtype=torch.int32)
        for key, value in case.items():
            tensors[f"{name}.{key}"] = value
        meta[f"{name}.dtype"] = dtype_name
        meta[f"{name}.note"] = note
        if kind in RECIPROCAL_SENSITIVE:
            meta[f"{name}.reciprocal_sensitive"] = "true"

    for name, n, blocksize, kind in BLOCKWISE8_CASES:
        gen = torch.Generator().manual_seed(args.seed + zlib.crc32(name.encode()))
        code = F.create_dynamic_map(signed=True).float()
        x = make_blockwise8_input(torch, kind, n, blocksize, code, gen)
        q, state = F.quantize_blockwise(x.to(dev), code=code.to(dev), blocksize=blocksize)
        back = F.dequantize_blockwise(q, state)
        tensors[f"{name}.input"] = x.contiguous()
        tensors[f"{name}.blocksize"] = torch.tensor([blocksize], dtype=torch.int32)
        tensors[f"{name}.quantized"] = q.cpu().contiguous()
        tensors[f"{name}.absmax"] = state.absmax.float().cpu().contiguous()
        tensors[f"{name}.dequant"] = back.float().cpu().contiguous()
        meta[f"{name}.note"] = f"8-bit blockwise, signed dynamic map, kind {kind}"
        if kind in RECIPROCAL_SENSITIVE:
            meta[f"{name}.reciprocal_sensitive"] = "true"

    if skipped:
        meta["skipped"] = "; ".join(skipped)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "nf4_bnb.safetensors")
    save_file(tensors, path, metadata=meta)
    size = os.path.getsize(path)
    n_cases = sum(1 for k in tensors if k.endswith(".input"))
    print(f"wrote {path}: {n_cases} cases, {len(tensors)} tensors, {size / 1024:.0f} KiB")
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, {meta['device']}")
    for s in skipped:
        print(f"skipped: {s}")
    if size > 1 << 20:
        print("warning: the fixture is over 1 MiB; shrink the cases", file=sys.stderr)


def quantize_case(torch, F, w, blocksize, dq):
    """bnb's NF4 quantization of w (on CUDA) and everything the Rust test compares against."""
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
    out = {
        "packed": packed.cpu().contiguous(),
        "quant_map": qs.code.float().cpu().contiguous(),
    }
    if dq:
        # The raw absmax is gone from a nested QuantState; the same input without double quantization gives it, and
        # must give the same nibbles.
        packed_raw, qs_raw = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
        if not torch.equal(packed_raw, packed):
            raise RuntimeError("packed bytes differ with and without double quantization")
        absmax_dq = F.dequantize_blockwise(qs.absmax, qs.state2)
        absmax_dq += qs.offset  # exactly dequantize_4bit's two steps
        out.update(
            {
                "absmax": qs.absmax.cpu().contiguous(),
                "absmax_raw": qs_raw.absmax.float().cpu().contiguous(),
                "nested_absmax": qs.state2.absmax.float().cpu().contiguous(),
                "nested_offset": qs.offset.float().reshape(1).cpu().contiguous(),
                "nested_code": qs.state2.code.float().cpu().contiguous(),
                "absmax_dequant": absmax_dq.float().cpu().contiguous(),
            }
        )
    else:
        out["absmax"] = qs.absmax.float().cpu().contiguous()
    qs32 = copy.copy(qs)
    qs32.dtype = torch.float32
    out["dequant"] = F.dequantize_4bit(packed, qs32).cpu().contiguous()
    if w.dtype != torch.float32:
        out["dequant_native"] = F.dequantize_4bit(packed, qs).cpu().contiguous()
    return out


def nf4_table(F):
    """bitsandbytes' NF4 code values and dQuantizeNF4's thresholds (csrc/kernels.cu), both f32: threshold k separates
    code k from code k + 1. The CUDA source spells the thresholds as literals; each is the midpoint of its two codes in
    double precision, which is how they are derived here from bnb's own table (so neither is copied by hand)."""
    code = F.get_4bit_type("nf4", device="cpu").float()
    wide = code.double()
    return code, ((wide[:-1] + wide[1:]) / 2).float()


def make_input(torch, kind, shape, gen, nf4):
    """An f32 weight of the given shape, and a note saying what it exercises. nf4: (codes, thresholds), nf4_table's."""
    rows, cols = shape
    n = rows * cols
    code, t = nf4
    if kind == "randn":
        return torch.randn(shape, generator=gen) * 0.02, "N(0, 0.02)"
    if kind == "rowscale":
        scale = 10.0 ** (torch.rand(rows, 1, generator=gen) * 2.5 - 2.0)
        return torch.randn(shape, generator=gen) * scale, "N(0, 1) rows scaled by 10^U(-2, 0.5): absmax over 2.5 decades"
    if kind == "zero_blocks":
        x = (torch.randn(n, generator=gen) * 0.02).reshape(-1)
        x[64:128] = 0.0  # an all-zero block in the middle
        x[192:] = 0.0  # an all-zero partial last block, odd n: its pad nibble too
        x[3:9] = -0.0  # negative zeros in a non-zero block
        return x.reshape(shape), "blocks 1 and 3 all zero (3 partial, odd n), -0.0 in block 0"
    if kind == "codes":
        rows_ = [torch.cat([code, code.flip(0)]) * 0.37, torch.cat([code.flip(0), code]) * -1.9]
        return torch.stack(rows_).reshape(shape), "NF4 code values times a scale (0.37, -1.9)"
    if kind == "ties":
        # Each row is one block whose largest |x| is a; its other values sit exactly on threshold·a as the kernel
        # sees it (x·(1/a) == threshold in f32), one ulp above, and one ulp below. a is a power of two, so 1/a is
        # exact on any hardware and the tie rule alone decides (the "edges" case covers other absmax values).
        out = []
        for a, sign in [(1.0, 1.0), (2.0, -1.0), (0.5, 1.0), (4.0, -1.0)]:
            a = torch.tensor(a, dtype=torch.float32)
            ties = exact_preimages(torch, t, a)
            up = torch.nextafter(ties, torch.full_like(ties, float("inf")))
            down = torch.nextafter(ties, torch.full_like(ties, -float("inf")))
            rest = (torch.rand(64 - 1 - 45, generator=gen) * 2 - 1) * a * 0.9
            out.append(torch.cat([(sign * a).reshape(1), ties, up, down, rest]))
        return torch.stack(out).reshape(shape), "values on threshold*absmax (x*(1/absmax) == threshold) and 1 ulp off"
    if kind == "edges":
        # Many blocks with random absmax, every value within an ulp of a threshold after scaling: as sensitive as
        # possible to how the kernel rounds 1/absmax and x*(1/absmax).
        out = []
        for _ in range(rows):
            a = (torch.exp(torch.randn((), generator=gen)) * 0.05).float()
            k = torch.randint(0, 15, (cols - 1,), generator=gen)
            x = exact_preimages(torch, t[k], a)
            out.append(torch.cat([a.reshape(1), nudge(torch, x, gen)]))
        return torch.stack(out).reshape(shape), "random absmax per block, values at threshold*absmax +- 1 ulp"
    if kind == "subnormal":
        # bnb's kernels flush subnormals to zero in every f32 max, multiply and compare (--use_fast_math).
        mn = torch.finfo(torch.float32).tiny  # smallest normal
        x = torch.zeros(shape)
        x[0] = (torch.rand(cols, generator=gen) * 2 - 1) * mn  # subnormals only: absmax 0 on the GPU
        tiny = 3.5 * mn
        x[1] = (torch.rand(cols, generator=gen) * 2 - 1) * tiny  # normal and subnormal values under a tiny absmax
        x[1, 0] = tiny
        x[1, 1] = 0.29 * tiny  # normal, but its code (10) times tiny is subnormal
        x[2] = (torch.rand(cols, generator=gen) * 2 - 1) * 1.0e38
        x[2, 0] = 2.0e38  # 1/absmax is subnormal: flushed, every code 7
        x[3] = torch.randn(cols, generator=gen) * 0.02
        x[3, 5:9] = torch.tensor([mn / 2, -mn / 3, mn / 7, -mn / 9])
        return x, "subnormals: a block of them, a tiny absmax, absmax 2e38, a few in a normal block"
    raise ValueError(kind)


def exact_preimages(torch, thresholds, a):
    """For each threshold t, an f32 x with x * (1/a) == t in f32 (IEEE reciprocal) when one exists near t*a, else t*a."""
    r = 1.0 / a
    x0 = thresholds * a
    best = x0.clone()
    found = torch.zeros_like(x0, dtype=torch.bool)
    for direction in (float("inf"), -float("inf")):
        x = x0.clone()
        for _ in range(6):
            hit = (x * r == thresholds) & ~found
            best = torch.where(hit, x, best)
            found |= hit
            x = torch.nextafter(x, torch.full_like(x, direction))
    return best


def nudge(torch, x, gen):
    """x with each element, at random, one ulp up, as it is, or one ulp down."""
    step = torch.randint(-1, 2, x.shape, generator=gen)
    x = torch.where(step > 0, torch.nextafter(x, torch.full_like(x, float("inf"))), x)
    return torch.where(step < 0, torch.nextafter(x, torch.full_like(x, -float("inf"))), x)


def make_blockwise8_input(torch, kind, n, blocksize, code, gen):
    if kind == "randn":
        return torch.randn(n, generator=gen) * 0.01
    if kind == "midpoints":
        # Block 0..: the first element is 1.0 (so the scale is exactly 1), then the f32 midpoints the kernel computes
        # ((upper + val) * 0.5) between neighbouring code values, and values one ulp either side of them.
        mids = (code[:-1] + code[1:]) * 0.5
        up = torch.nextafter(mids, torch.full_like(mids, float("inf")))
        down = torch.nextafter(mids, torch.full_like(mids, -float("inf")))
        vals = torch.cat([mids, up, down, code])
        perm = torch.randperm(vals.numel(), generator=gen)
        vals = vals[perm]
        x = torch.empty(n)
        per_block = blocksize - 1
        for b in range(n // blocksize):
            chunk = vals[(b * per_block) % vals.numel():][:per_block]
            if chunk.numel() < per_block:
                chunk = torch.cat([chunk, vals[: per_block - chunk.numel()]])
            x[b * blocksize] = 1.0
            x[b * blocksize + 1 : (b + 1) * blocksize] = chunk
        return x
    if kind == "edges":
        # Random absmax per block, values whose scaled form is a midpoint the kernel computes, or 1 ulp off.
        mids = (code[:-1] + code[1:]) * 0.5
        x = torch.empty(n)
        for b in range(n // blocksize):
            a = (torch.exp(torch.randn((), generator=gen)) * 0.05).float()
            k = torch.randint(0, 255, (blocksize - 1,), generator=gen)
            x[b * blocksize] = a
            x[b * blocksize + 1 : (b + 1) * blocksize] = nudge(torch, exact_preimages(torch, mids[k], a), gen)
        return x
    raise ValueError(kind)


if __name__ == "__main__":
    main()
