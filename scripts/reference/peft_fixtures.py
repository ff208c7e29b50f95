#!/usr/bin/env python3
"""Dump peft's LoRA / rsLoRA / DoRA forward, backward, merge and unmerge of small layers as fixtures for
`autograd/tests/lora.rs` (the test `matches_peft_forward_backward_and_merge`).

The oracle is peft's own `lora.Linear`, built by `get_peft_model` around a one-layer module and run on CPU tensors, so
the numbers depend on neither a GPU nor its kernels. Dropout is 0: peft draws its mask from torch's RNG, which the Rust
side cannot reproduce (its own dropout is checked there by finite differences instead).

Usage (checked with torch 2.11, transformers 5.17, peft 0.21; a GPU is neither needed nor used):

    python3 scripts/reference/peft_fixtures.py --out tests/fixtures/peft

writes `peft_lora.safetensors` (about 150 KiB). Tensor names, for each case `{case}` ("lead" = leading dims of x):

    {case}.x                            [lead..., in]  the input, in the case's dtype
    {case}.weight                       [out, in]      the frozen base weight, in the case's dtype
    {case}.bias                         [out]          the base bias, made trainable here to get its gradient
    {case}.lora_A                       F32 [r, in]    random, non-zero
    {case}.lora_B                       F32 [out, r]   random, non-zero, so that B·A ≠ 0
    {case}.lora_magnitude_vector        F32 [out]      DoRA only: ‖W + s·B·A‖ per row times U(0.6, 1.4), so m/n ≠ 1
    {case}.grad_output                  [lead..., out] the upstream gradient, in y's dtype
    {case}.y                            [lead..., out] peft's output
    {case}.grad_x, .grad_bias           like x, bias
    {case}.grad_lora_A, .grad_lora_B    F32
    {case}.grad_lora_magnitude_vector   F32 [out]      DoRA only
    {case}.delta_weight                 F32 [out, in]  get_delta_weight: s·B·A
    {case}.merged_weight                [out, in]      the base weight after merge(safe_merge=True)
    {case}.weight_norm                  F32 [out]      DoRA only: the norm merge caches for unmerge
    {case}.unmerged_weight              [out, in]      the base weight after unmerge()

The safetensors metadata holds the versions, `cases` (comma-separated), and per case `{case}.dtype` ("float32" or
"bfloat16": the dtype of the base layer and of x; the adapter stays f32, as get_peft_model's default
autocast_adapter_dtype=True leaves it over a 16-bit base), `.r`, `.lora_alpha`, `.use_rslora` and `.use_dora`
("true"/"false"), `.scaling` (peft's float, repr), `.module` (the key prefix of this layer in peft's state dict) and
`.peft_keys` (the comma-separated keys get_peft_model_state_dict returns for it).
"""

import math
import os
import zlib

from fixture_cli import fail, fixture_args, fixture_meta, require

# (name, in_features, out_features, r, lora_alpha, use_rslora, use_dora, dtype, leading dims of x). Each case is
# seeded from its own name, so adding one never changes another.
CASES = [
    ("lora_f32", 48, 40, 8, 16, False, False, "float32", (2, 3)),
    ("rslora_f32", 37, 29, 8, 16, True, False, "float32", (5,)),
    ("dora_f32", 37, 29, 8, 16, False, True, "float32", (2, 3)),
    ("dora_rslora_f32", 48, 40, 4, 8, True, True, "float32", (7,)),
    ("lora_bf16", 48, 40, 8, 16, False, False, "bfloat16", (2, 3)),
    ("dora_bf16", 37, 29, 8, 16, False, True, "bfloat16", (5,)),
]


def main():
    args = fixture_args(__doc__, "tests/fixtures/peft", 20240611, seed_help="base seed; each case adds crc32(name)")

    torch = require("torch", "PyTorch (pip install torch)")
    peft = require("peft", "peft (pip install peft)")
    save_file = require("safetensors.torch", "the safetensors package (pip install safetensors)").save_file

    tensors = {}
    cases = ",".join(name for name, *_ in CASES)
    meta = fixture_meta("peft", args.seed, torch, peft=peft.__version__, device="cpu", cases=cases)
    for name, in_f, out_f, r, alpha, rslora, dora, dtype_name, lead in CASES:
        seed = args.seed + zlib.crc32(name.encode())
        case_tensors, case_meta = run_case(torch, peft, in_f, out_f, r, alpha, rslora, dora, dtype_name, lead, seed)
        tensors.update({f"{name}.{k}": v for k, v in case_tensors.items()})
        meta.update({f"{name}.{k}": v for k, v in case_meta.items()})

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "peft_lora.safetensors")
    save_file(tensors, path, metadata=meta)
    print(f"wrote {path}: {len(CASES)} cases, {len(tensors)} tensors, {os.path.getsize(path) / 1024:.0f} KiB")
    print(f"torch {torch.__version__}, peft {peft.__version__}")


def run_case(torch, peft, in_f, out_f, r, alpha, rslora, dora, dtype_name, lead, seed):
    """peft's forward, backward, merge and unmerge of one adapted nn.Linear; returns (tensors, metadata)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    torch.manual_seed(seed)  # peft's own init draws from the global generator; everything it draws is replaced
    gen = torch.Generator().manual_seed(seed)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(in_f, out_f, bias=True)

        def forward(self, x):
            return self.proj(x)

    model = Tiny()
    bound = 1.0 / math.sqrt(in_f)  # nn.Linear's own init range
    with torch.no_grad():
        model.proj.weight.copy_((torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound)
        model.proj.bias.copy_((torch.rand(out_f, generator=gen) * 2 - 1) * bound)
    model = model.to(dtype)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=["proj"],
        use_rslora=rslora,
        use_dora=dora,
        init_lora_weights=True,
        bias="none",
    )
    pm = get_peft_model(model, config)
    layer = pm.base_model.model.proj
    if not isinstance(layer, peft.tuners.lora.Linear):
        fail(f"expected peft.tuners.lora.Linear around proj, got {type(layer).__name__}")
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    if lora_a.dtype != torch.float32:
        fail(f"expected f32 adapter weights over a {dtype_name} base, got {lora_a.dtype}")
    # Older peft initialises DoRA's magnitude lazily on the first forward; run one so the values set below stick.
    with torch.no_grad():
        layer(torch.zeros(1, in_f, dtype=dtype))

    scaling = layer.scaling["default"]
    a = torch.randn(r, in_f, generator=gen) * bound
    b = torch.randn(out_f, r, generator=gen) * 0.1
    with torch.no_grad():
        lora_a.copy_(a)
        lora_b.copy_(b)
        if dora:
            n = torch.linalg.norm(layer.base_layer.weight.float() + scaling * (b @ a), dim=1)
            layer.lora_magnitude_vector["default"].weight.copy_(n * (0.6 + 0.8 * torch.rand(out_f, generator=gen)))
    base_w = layer.base_layer.weight
    base_b = layer.base_layer.bias
    base_b.requires_grad_(True)

    x = torch.randn(*lead, in_f, generator=gen).to(dtype).requires_grad_(True)
    layer.train()
    y = layer(x)
    g = torch.randn(y.shape, generator=gen).to(y.dtype)
    y.backward(g)
    if base_w.grad is not None:
        fail("peft produced a gradient for the frozen base weight")

    out = {
        "x": x.detach(),
        "weight": base_w.detach().clone(),
        "bias": base_b.detach().clone(),
        "lora_A": lora_a.detach().clone(),
        "lora_B": lora_b.detach().clone(),
        "grad_output": g,
        "y": y.detach(),
        "grad_x": x.grad,
        "grad_bias": base_b.grad,
        "grad_lora_A": lora_a.grad,
        "grad_lora_B": lora_b.grad,
        "delta_weight": layer.get_delta_weight("default").detach(),
    }
    if dora:
        magnitude = layer.lora_magnitude_vector["default"].weight
        out["lora_magnitude_vector"] = magnitude.detach().clone()
        out["grad_lora_magnitude_vector"] = magnitude.grad

    state = get_peft_model_state_dict(pm)
    suffix = ".lora_A.weight"
    module = next((k[: -len(suffix)] for k in state if k.endswith(suffix)), None)
    if module is None:
        fail(f"no *{suffix} key in peft's state dict: {sorted(state)}")

    with torch.no_grad():
        layer.merge(safe_merge=True)
        out["merged_weight"] = base_w.detach().clone()
        if dora:
            norm = getattr(layer, "_caches", {}).get("default-weight_norm")
            if norm is None:
                fail("peft's DoRA merge cached no 'default-weight_norm'; its merge/unmerge changed")
            out["weight_norm"] = norm.detach().clone()
        layer.unmerge()
        out["unmerged_weight"] = base_w.detach().clone()

    for k, v in out.items():
        if v is None:
            fail(f"peft returned no {k}")
        out[k] = v.detach().cpu().contiguous()
    case_meta = {
        "dtype": dtype_name,
        "r": str(r),
        "lora_alpha": repr(float(alpha)),
        "use_rslora": "true" if rslora else "false",
        "use_dora": "true" if dora else "false",
        "scaling": repr(float(scaling)),
        "module": module,
        "peft_keys": ",".join(sorted(state)),
    }
    return out, case_meta


if __name__ == "__main__":
    main()
