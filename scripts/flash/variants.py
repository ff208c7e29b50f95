"""Flash-attention tile variants against torch's SDPA, in one process on the GPU machine.

Builds scripts/flash/variants.cu with nvcc into a shared library, then for each variant: checks forward (out, lse)
and backward (dq, dk, dv) against a float32 reference on a small packed batch with GQA, and times it on the issue's
shapes (causal 4 x 2048, 32/8 heads at head_dim 64 and 128, 8/4 heads at 256; a 4096 window over 8192 tokens)
next to torch.nn.functional.scaled_dot_product_attention on the same inputs. FLOPs: causal forward 2*b*h*t^2*d
(half of the full 4*b*h*t^2*d), backward 2.5x forward. Prints one JSON line per measurement.

Usage (GPU machine, repo root): python3 scripts/flash/variants.py [--only SUBSTRING]
"""
import argparse, ctypes, json, math, os, subprocess, sys, tempfile
import torch
import torch.nn.functional as F
from triton.testing import do_bench

HERE = os.path.dirname(os.path.abspath(__file__))


def build():
    so = os.path.join(tempfile.gettempdir(), "flash_variants.so")
    cmd = ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
           "-lineinfo", "-o", so, os.path.join(HERE, "variants.cu")]
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(so)
    lib.variant_name.restype = ctypes.c_char_p
    lib.launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)] + [ctypes.c_int] * 6 + \
        [ctypes.c_float, ctypes.c_float] + [ctypes.c_int] * 3 + [ctypes.c_ulonglong]
    return lib


class Batch:
    """A packed batch [tokens, heads, d] of equal-length sequences, with what backward reads."""

    def __init__(self, seqs, t, h, kvh, d, window=0, softcap=0.0, causal=True, dtype=torch.bfloat16):
        dev = "cuda"
        n = seqs * t
        self.seqs, self.t, self.h, self.kvh, self.d = seqs, t, h, kvh, d
        self.window, self.softcap, self.causal = window, softcap, causal
        g = torch.Generator(device=dev).manual_seed(0)
        r = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.float32).to(dtype)
        self.q, self.k, self.v, self.do = r(n, h, d), r(n, kvh, d), r(n, kvh, d), r(n, h, d)
        self.out = torch.empty_like(self.q)
        self.lse = torch.empty(n, h, device=dev, dtype=torch.float32)
        self.dq_accum = torch.zeros(n, h, d, device=dev, dtype=torch.float32)
        self.dk, self.dv = torch.empty_like(self.k), torch.empty_like(self.v)
        self.delta = torch.zeros(n, h, device=dev, dtype=torch.float32)
        self.cu = torch.arange(0, n + 1, t, device=dev, dtype=torch.int32)
        self.scale = 1.0 / math.sqrt(d)

    def ptrs(self):
        ts = [self.q, self.k, self.v, self.out, self.lse, self.do, self.delta, self.dq_accum, self.dk, self.dv,
              self.cu, self.cu]
        return (ctypes.c_ulonglong * 12)(*[x.data_ptr() for x in ts])

    def launch(self, lib, i, ptrs=None):
        stream = torch.cuda.current_stream().cuda_stream
        e = lib.launch(i, ptrs or self.ptrs(), self.seqs, self.t, self.h, self.kvh, self.d, self.window, self.scale,
                       self.softcap, int(self.causal), self.seqs * self.t, self.seqs * self.t, stream)
        if e:
            raise RuntimeError(f"launch of variant {i} failed: cuda error {e}")

    def reference(self):
        """float32 eager attention with repeat_kv, softcap and masks: (out, lse, dq, dk, dv)."""
        s, t, h, kvh, d = self.seqs, self.t, self.h, self.kvh, self.d
        q = self.q.float().view(s, t, h, d).transpose(1, 2).requires_grad_()
        k = self.k.float().view(s, t, kvh, d).transpose(1, 2).requires_grad_()
        v = self.v.float().view(s, t, kvh, d).transpose(1, 2).requires_grad_()
        kk, vv = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
        sc = q @ kk.transpose(-1, -2) * self.scale
        if self.softcap:
            sc = self.softcap * torch.tanh(sc / self.softcap)
        i = torch.arange(t, device="cuda")[:, None]
        j = torch.arange(t, device="cuda")[None, :]
        vis = torch.ones(t, t, dtype=torch.bool, device="cuda")
        if self.causal:
            vis &= j <= i
        if self.window:
            vis &= (i - j) < self.window
        sc = sc.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(sc, -1)
        o = torch.softmax(sc, -1) @ vv
        o.backward(self.do.float().view(s, t, h, d).transpose(1, 2))
        back = lambda x, heads: x.transpose(1, 2).reshape(s * t, heads, d)
        return back(o.detach(), h), lse.transpose(1, 2).reshape(s * t, h), back(q.grad, h), back(k.grad, kvh), \
            back(v.grad, kvh)

    def backward(self, lib, i):
        self.delta.copy_((self.out.float() * self.do.float()).sum(-1))
        self.dq_accum.zero_()
        self.launch(lib, i)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--once", action="store_true", help="launch each selected variant once on 4 x 2048 (for ncu)")
    a = ap.parse_args()
    lib = build()
    names = [lib.variant_name(i).decode() for i in range(lib.n_variants())]
    fwd_of = {}  # d -> the first forward variant, which writes out/lse for the backward checks
    for i, n in enumerate(names):
        if n.startswith("fwd"):
            fwd_of.setdefault(lib.variant_d(i), i)

    if a.once:
        for i, n in enumerate(names):
            if a.only in n:
                d = lib.variant_d(i)
                b = Batch(4, 2048, 32 if d < 256 else 8, 8 if d < 256 else 4, d)
                b.launch(lib, fwd_of[d])
                if n.startswith("bwd"):
                    b.backward(lib, i)
                else:
                    b.launch(lib, i)
        torch.cuda.synchronize()
        return

    # Correctness on a small pack: 3 sequences of 300 tokens, GQA 4, causal with a window and a softcap.
    for i, n in enumerate(names):
        if a.only not in n:
            continue
        d = lib.variant_d(i)
        b = Batch(3, 300, 8, 2, d, window=100 if d != 64 else 0, softcap=30.0 if d == 256 else 0.0)
        ro, rl, rdq, rdk, rdv = b.reference()
        b.launch(lib, fwd_of[d])
        torch.cuda.synchronize()
        res = dict(variant=n, check="small pack")
        if n.startswith("fwd"):
            b.launch(lib, i)
            res.update(out=rel(b.out, ro), lse=rel(b.lse, rl))
        else:
            b.backward(lib, i)
            res.update(dq=rel(b.dq_accum, rdq), dk=rel(b.dk, rdk), dv=rel(b.dv, rdv))
        torch.cuda.synchronize()
        res["ok"] = all(v < 2e-2 for k, v in res.items() if isinstance(v, float))
        print(json.dumps(res), flush=True)

    shapes = [(4, 2048, 32, 8, 64, 0), (4, 2048, 32, 8, 128, 0), (4, 2048, 8, 4, 256, 0), (1, 8192, 32, 8, 128, 0),
              (1, 8192, 32, 8, 128, 4096)]
    for (s, t, h, kvh, d, w) in shapes:
        b = Batch(s, t, h, kvh, d, window=w)
        fl = 2 * s * h * t * t * d if not w else 4 * s * h * d * (w * t - w * (w - 1) / 2)
        tag = f"{s}x{t} h{h}/{kvh} d{d}" + (f" window {w}" if w else "")
        q = b.q.view(s, t, h, d).transpose(1, 2)
        k = b.k.view(s, t, kvh, d).transpose(1, 2)
        v = b.v.view(s, t, kvh, d).transpose(1, 2)
        if not w:
            f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            ms = do_bench(f, warmup=25, rep=200, return_mode="median")
            print(json.dumps(dict(kernel="sdpa fwd", shape=tag, ms=round(ms, 4), tflops=round(fl / ms / 1e9, 1))))
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            go = torch.randn_like(q)
            fb = lambda: torch.autograd.grad(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True),
                                             (qq, kk, vv), go)
            ms = do_bench(fb, warmup=25, rep=200, return_mode="median")
            print(json.dumps(dict(kernel="sdpa fwd+bwd", shape=tag, ms=round(ms, 4),
                                  tflops=round(3.5 * fl / ms / 1e9, 1))))
        ptrs = b.ptrs()
        for i, n in enumerate(names):
            if lib.variant_d(i) != d or a.only not in n:
                continue
            if n.startswith("fwd"):
                ms = do_bench(lambda: b.launch(lib, i, ptrs), warmup=25, rep=200, return_mode="median")
                print(json.dumps(dict(kernel=n, shape=tag, ms=round(ms, 4), tflops=round(fl / ms / 1e9, 1))),
                      flush=True)
            else:
                b.launch(lib, fwd_of[d], ptrs)
                ms = do_bench(lambda: b.launch(lib, i, ptrs), warmup=25, rep=200, return_mode="median")
                print(json.dumps(dict(kernel=n, shape=tag, ms=round(ms, 4), tflops=round(2.5 * fl / ms / 1e9, 1))),
                      flush=True)


if __name__ == "__main__":
    main()
