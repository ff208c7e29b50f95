"""Flash-attention tile variants against torch's SDPA, in one process on the GPU machine.

Builds scripts/flash/variants.cu with nvcc into a shared library, then for each variant: checks forward (out, lse)
and backward (dq, dk, dv) against a float32 reference on a small packed batch with GQA, and times it on the issue's
shapes (causal 4 x 2048, 32/8 heads at head_dim 64 and 128, 8/4 heads at 256; a 4096 window over 8192 tokens)
next to torch.nn.functional.scaled_dot_product_attention on the same inputs. FLOPs: causal forward 2*b*h*t^2*d
(half of the full 4*b*h*t^2*d), backward 2.5x forward. Prints one JSON line per measurement.

Hopper variants (names "fwd90 ...", "fwd90ws ...", "bwd90 ...", "bwd90s ...": wgmma, kernels/cuda/flash_attention_sm90*.cuh) are
marked "sm90": true; the wgmma layout self-test runs first whenever one is selected (--selftest runs only it), and
they also get a varlen check (unequal and q ≠ k lengths, bottom-right causal, window, softcap, GQA 1/4/8, head_dim
below the padded D and not a multiple of 8). Timings print x_sdpa (SDPA's time / the variant's) and, for the window
shape, x_full (the same variant's full-causal time on 8192 tokens / its window time); backward rows print
x_sdpa_fb = SDPA's forward+backward time / (the fastest forward timed on that shape + this backward), an estimate that
leaves out the small delta and dq-conversion passes (select forwards too, e.g. --only 90, for it to mean much).

Usage (GPU machine, repo root): python3 scripts/flash/variants.py [--only SUBSTRING[|SUBSTRING…]] [--once] [--selftest] [--no-time]
"""
import argparse, ctypes, json, math, os, subprocess, sys, tempfile
import torch
import torch.nn.functional as F
from triton.testing import do_bench

HERE = os.path.dirname(os.path.abspath(__file__))


def build():
    """The variants library: FLASH_VARIANTS_SO names one built beforehand (nvcc's -shared build of variants.cu, as below,
    done where the compiler time costs no device time), else nvcc builds it here."""
    so = os.environ.get("FLASH_VARIANTS_SO")
    if not so:
        so = os.path.join(tempfile.gettempdir(), "flash_variants.so")
        cmd = ["nvcc", "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
               "-lineinfo", "-o", so, os.path.join(HERE, "variants.cu")]
        subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(so)
    lib.variant_name.restype = ctypes.c_char_p
    lib.selftest.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong), ctypes.c_ulonglong]
    lib.launch.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)] + [ctypes.c_int] * 6 + \
        [ctypes.c_float, ctypes.c_float] + [ctypes.c_int] * 3 + [ctypes.c_ulonglong]
    return lib


def scores(q, kk, b, lq, lk):
    """q·kkᵀ scaled and softcapped as batch b's kernels do, and the [lq, lk] mask of the keys each query sees: queries
    bottom-right aligned (query r at position r + lk − lq), b's causal mask and sliding window."""
    sc = q @ kk.transpose(-1, -2) * b.scale
    if b.softcap:
        sc = b.softcap * torch.tanh(sc / b.softcap)
    i = torch.arange(lq, device="cuda")[:, None] + lk - lq
    j = torch.arange(lk, device="cuda")[None, :]
    vis = torch.ones(lq, lk, dtype=torch.bool, device="cuda")
    if b.causal:
        vis &= j <= i
    if b.window:
        vis &= (i - j) < b.window
    return sc, vis


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
        sc, vis = scores(q, kk, self, t, t)
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


def rel_lse(a, b):
    """Relative error over the finite entries of b; inf (a failure) where the −∞ (no visible key) entries differ."""
    a, b = a.float(), b.float()
    fin = torch.isfinite(b)
    if not torch.equal(torch.isneginf(a), torch.isneginf(b)) or not torch.isfinite(a[fin]).all():
        return float("inf")
    return rel(a[fin], b[fin]) if fin.any() else 0.0


def picked(only, name):
    return any(x in name for x in only.split("|"))


def is_sm90(name):
    return name.split(" ")[0] in ("fwd90", "fwd90ws", "bwd90", "bwd90s", "bwd90ws")


class VarBatch:
    """A packed batch of sequences with their own query and key lengths (bottom-right alignment), head_dim hd ≤ the
    variant's padded D, and what backward reads. Outputs start as NaN so that rows a kernel fails to write show."""

    def __init__(self, lens_q, lens_k, h, kvh, hd, window=0, softcap=0.0, causal=True, scale=None, seed=0,
                 dtype=torch.bfloat16):
        dev = "cuda"
        self.lens_q, self.lens_k, self.h, self.kvh, self.hd = list(lens_q), list(lens_k), h, kvh, hd
        self.window, self.softcap, self.causal = window, softcap, causal
        tq, tk = sum(lens_q), sum(lens_k)
        g = torch.Generator(device=dev).manual_seed(seed)
        r = lambda *sh: torch.randn(*sh, device=dev, generator=g, dtype=torch.float32).to(dtype)
        self.q, self.k, self.v, self.do = r(tq, h, hd), r(tk, kvh, hd), r(tk, kvh, hd), r(tq, h, hd)
        nan = float("nan")
        self.out = torch.full_like(self.q, nan)
        self.lse = torch.full((tq, h), nan, device=dev, dtype=torch.float32)
        self.dq_accum = torch.zeros(tq, h, hd, device=dev, dtype=torch.float32)
        self.dk, self.dv = torch.full_like(self.k, nan), torch.full_like(self.v, nan)
        self.delta = torch.zeros(tq, h, device=dev, dtype=torch.float32)
        z = torch.zeros(1, dtype=torch.int32)
        self.cu_q = torch.cat([z, torch.tensor(lens_q, dtype=torch.int32).cumsum(0)]).to(dev, torch.int32)
        self.cu_k = torch.cat([z, torch.tensor(lens_k, dtype=torch.int32).cumsum(0)]).to(dev, torch.int32)
        self.scale = scale if scale is not None else 1.0 / math.sqrt(hd)

    def ptrs(self):
        ts = [self.q, self.k, self.v, self.out, self.lse, self.do, self.delta, self.dq_accum, self.dk, self.dv,
              self.cu_q, self.cu_k]
        return (ctypes.c_ulonglong * 12)(*[x.data_ptr() for x in ts])

    def launch(self, lib, i, fwd):
        stream = torch.cuda.current_stream().cuda_stream
        rows = max(self.lens_q) if fwd else max(self.lens_k)
        e = lib.launch(i, self.ptrs(), len(self.lens_q), rows, self.h, self.kvh, self.hd, self.window, self.scale,
                       self.softcap, int(self.causal), sum(self.lens_q), sum(self.lens_k), stream)
        if e:
            raise RuntimeError(f"launch of variant {i} failed: cuda error {e}")

    def backward(self, lib, i):
        self.delta.copy_((self.out.float() * self.do.float()).sum(-1))
        self.dq_accum.zero_()
        self.launch(lib, i, fwd=False)

    def reference(self):
        """float32 per sequence: (out, lse, dq, dk, dv); a query that sees no key gets out 0, lse −∞, no gradient."""
        outs, lses, dqs, dks, dvs = [], [], [], [], []
        grp = self.h // self.kvh
        q0 = k0 = 0
        for lq, lk in zip(self.lens_q, self.lens_k):
            q = self.q[q0:q0 + lq].float().transpose(0, 1).requires_grad_()  # [h, lq, hd]
            k = self.k[k0:k0 + lk].float().transpose(0, 1).requires_grad_()
            v = self.v[k0:k0 + lk].float().transpose(0, 1).requires_grad_()
            kk, vv = k.repeat_interleave(grp, 0), v.repeat_interleave(grp, 0)
            sc, vis = scores(q, kk, self, lq, lk)
            valid = vis.any(-1, keepdim=True)
            sc = sc.masked_fill(~vis, float("-inf")).masked_fill(~valid, 0.0)
            lse = torch.logsumexp(sc, -1).masked_fill(~valid[:, 0], float("-inf"))
            o = (torch.softmax(sc, -1) * valid) @ vv
            o.backward(self.do[q0:q0 + lq].float().transpose(0, 1))
            outs.append(o.detach().transpose(0, 1))
            lses.append(lse.detach().transpose(0, 1))
            dqs.append(q.grad.transpose(0, 1))
            dks.append(k.grad.transpose(0, 1))
            dvs.append(v.grad.transpose(0, 1))
            q0, k0 = q0 + lq, k0 + lk
        return torch.cat(outs), torch.cat(lses), torch.cat(dqs), torch.cat(dks), torch.cat(dvs)


# (lens_q, lens_k, h, kvh, hd offset below D (None: D − 24 rounded to 8, at least 8), window, softcap, causal, scale)
VAR_CASES = [
    ([1, 17, 64, 129, 300, 65], None, 8, 2, 0, 0, 0.0, True, None),  # unequal lengths, causal, GQA 4
    ([5, 100, 1, 250], [40, 300, 77, 250], 8, 8, 0, 0, 0.0, True, None),  # len_q < len_k: bottom-right, MHA
    ([50, 7], [10, 7], 8, 1, 0, 0, 0.0, True, None),  # len_q > len_k: rows that see no key (lse −∞), MQA
    ([200, 33], [180, 333], 8, 2, 0, 0, 0.0, False, 0.3),  # not causal, any scale
    ([300, 129], None, 8, 2, 0, 37, 0.0, True, None),  # window, causal
    ([300, 96], [300, 200], 16, 2, 0, 100, 30.0, True, None),  # window + softcap, GQA 8
    ([130, 70], None, 8, 2, None, 0, 0.0, True, None),  # head_dim < D
    ([130, 70], None, 8, 2, "odd", 0, 20.0, True, None),  # head_dim < D and not a multiple of 8, softcap
]


def var_cases(d):
    for (lq, lk, h, kvh, hdo, w, cap, causal, scale) in VAR_CASES:
        if hdo is None:
            hd = max(8, (d - 24) // 8 * 8)
        elif hdo == "odd":
            hd = d - 27
        else:
            hd = d - hdo
        yield VarBatch(lq, lk if lk is not None else lq, h, kvh, hd, window=w, softcap=cap, causal=causal,
                       scale=scale), dict(lens_q=lq, lens_k=lk or lq, h=h, kvh=kvh, hd=hd, window=w, softcap=cap,
                                          causal=causal)


def run_selftest(lib):
    """The wgmma layout self-test (variants.cu wgmma_selftest): one warpgroup, C = Q·Kᵀ (SS, K-major), O = bf16(C)·V
    (RS, N-major B), O2 = bf16(C)·V[:, 32:64] (N-major B starting mid-row) and C3 = V[:, :64]ᵀ·K[:, :64] (M-major A)."""
    ok_all = True
    for i in range(lib.n_selftests()):
        d, bn = lib.selftest_d(i), lib.selftest_bn(i)
        g = torch.Generator(device="cuda").manual_seed(i)
        r = lambda *sh: torch.randn(*sh, device="cuda", generator=g).to(torch.bfloat16)
        q, k, v = r(64, d), r(bn, d), r(bn, d)
        c = torch.full((64, bn), float("nan"), device="cuda")
        o = torch.full((64, d), float("nan"), device="cuda")
        o2 = torch.full((64, 32), float("nan"), device="cuda")
        c3 = torch.full((64, 64), float("nan"), device="cuda")
        ptrs = (ctypes.c_ulonglong * 7)(*[x.data_ptr() for x in (q, k, v, c, o, o2, c3)])
        e = lib.selftest(i, ptrs, torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        c_ref = q.float() @ k.float().T
        o_ref = c.to(torch.bfloat16).float() @ v.float()  # P rounded as the kernel rounds it
        res = dict(selftest=f"wgmma d{d} bn{bn}", launch=e, c=rel(c, c_ref), o=rel(o, o_ref),
                   o_vs_exact=rel(o, c_ref.to(torch.bfloat16).float() @ v.float()),
                   o2_offset_b=rel(o2, o_ref[:, 32:64]), c3_trans_a=rel(c3, v[:, :64].float().T @ k[:, :64].float()))
        res["ok"] = e == 0 and res["c"] < 1e-3 and res["o"] < 1e-2 and res["o2_offset_b"] < 1e-2 and \
            res["c3_trans_a"] < 1e-3
        if not res["ok"]:
            # Where the first wrong entries sit tells a descriptor/swizzle slip from a fragment-mapping one.
            bad = ((c - c_ref).abs() > 1e-2 * c_ref.abs().clamp_min(1)).nonzero()[:8].tolist()
            res["c_bad_first"] = bad
        ok_all &= res["ok"]
        print(json.dumps(res), flush=True)
    return ok_all


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="variants whose name contains this (alternatives split by |)")
    ap.add_argument("--once", action="store_true", help="launch each selected variant once on 4 x 2048 (for ncu)")
    ap.add_argument("--selftest", action="store_true", help="run only the wgmma layout self-test")
    ap.add_argument("--no-time", action="store_true", help="correctness checks only")
    a = ap.parse_args()
    lib = build()
    names = [lib.variant_name(i).decode() for i in range(lib.n_variants())]
    if a.selftest or any(is_sm90(n) and picked(a.only, n) for n in names):
        if not run_selftest(lib) and not a.selftest:
            print(json.dumps(dict(note="wgmma self-test failed: sm90 variants below will be wrong too")), flush=True)
        if a.selftest:
            return
    fwd_of = {}  # d -> the first forward variant, which writes out/lse for the backward checks
    for i, n in enumerate(names):
        if n.startswith("fwd"):
            fwd_of.setdefault(lib.variant_d(i), i)

    if a.once:
        for i, n in enumerate(names):
            if picked(a.only, n):
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
        if not picked(a.only, n):
            continue
        d = lib.variant_d(i)
        b = Batch(3, 300, 8, 2, d, window=100 if d != 64 else 0, softcap=30.0 if d == 256 else 0.0)
        ro, rl, rdq, rdk, rdv = b.reference()
        b.launch(lib, fwd_of[d])
        torch.cuda.synchronize()
        res = dict(variant=n, check="small pack")
        if is_sm90(n):
            res["sm90"] = True
        if n.startswith("fwd"):
            b.out.fill_(float("nan"))
            b.lse.fill_(float("nan"))
            b.launch(lib, i)
            res.update(out=rel(b.out, ro), lse=rel(b.lse, rl))
        else:
            b.backward(lib, i)
            res.update(dq=rel(b.dq_accum, rdq), dk=rel(b.dk, rdk), dv=rel(b.dv, rdv))
        torch.cuda.synchronize()
        res["ok"] = all(v < 2e-2 for k, v in res.items() if isinstance(v, float))
        print(json.dumps(res), flush=True)

    # Varlen checks of the Hopper variants.
    for i, n in enumerate(names):
        if not picked(a.only, n) or not is_sm90(n):
            continue
        d = lib.variant_d(i)
        for vb, desc in var_cases(d):
            ro, rl, rdq, rdk, rdv = vb.reference()
            res = dict(variant=n, check="varlen", sm90=True, **desc)
            if n.startswith("fwd"):
                vb.launch(lib, i, fwd=True)
                torch.cuda.synchronize()
                res.update(out=rel(vb.out, ro), lse=rel_lse(vb.lse, rl))
            else:
                vb.launch(lib, fwd_of[d], fwd=True)  # the sm80 forward writes out and lse
                vb.backward(lib, i)
                torch.cuda.synchronize()
                res.update(dq=rel(vb.dq_accum, rdq), dk=rel(vb.dk, rdk), dv=rel(vb.dv, rdv))
            res["ok"] = all(res[k] < 2e-2 for k in ("out", "lse", "dq", "dk", "dv") if k in res)
            print(json.dumps(res), flush=True)
    if a.no_time:
        return

    shapes = [(4, 2048, 32, 8, 64, 0), (4, 2048, 32, 8, 128, 0), (4, 2048, 8, 4, 256, 0), (1, 8192, 32, 8, 128, 0),
              (1, 8192, 32, 8, 128, 4096)]
    full_ms = {}  # variant -> ms on the full-causal 8192-token shape, for the window shape's x_full
    for (s, t, h, kvh, d, w) in shapes:
        sdpa = {}
        b = Batch(s, t, h, kvh, d, window=w)
        fl = 2 * s * h * t * t * d if not w else 4 * s * h * d * (w * t - w * (w - 1) / 2)
        tag = f"{s}x{t} h{h}/{kvh} d{d}" + (f" window {w}" if w else "")
        q = b.q.view(s, t, h, d).transpose(1, 2)
        k = b.k.view(s, t, kvh, d).transpose(1, 2)
        v = b.v.view(s, t, kvh, d).transpose(1, 2)
        if not w:
            f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            ms = do_bench(f, warmup=25, rep=200, return_mode="median")
            sdpa["fwd"] = ms
            print(json.dumps(dict(kernel="sdpa fwd", shape=tag, ms=round(ms, 4), tflops=round(fl / ms / 1e9, 1))))
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            go = torch.randn_like(q)
            fb = lambda: torch.autograd.grad(F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True),
                                             (qq, kk, vv), go)
            ms = do_bench(fb, warmup=25, rep=200, return_mode="median")
            sdpa["fwd+bwd"] = ms
            print(json.dumps(dict(kernel="sdpa fwd+bwd", shape=tag, ms=round(ms, 4),
                                  tflops=round(3.5 * fl / ms / 1e9, 1))))
        ptrs = b.ptrs()
        best_fwd = None  # (ms, name) of the fastest forward timed on this shape
        for i, n in enumerate(names):
            if lib.variant_d(i) != d or not picked(a.only, n):
                continue
            if n.startswith("fwd"):
                ms = do_bench(lambda: b.launch(lib, i, ptrs), warmup=25, rep=200, return_mode="median")
                res = dict(kernel=n, shape=tag, ms=round(ms, 4), tflops=round(fl / ms / 1e9, 1))
                if is_sm90(n):
                    res["sm90"] = True
                if "fwd" in sdpa:
                    res["x_sdpa"] = round(sdpa["fwd"] / ms, 3)
                if t == 8192 and not w:
                    full_ms[n] = ms
                if w and n in full_ms:
                    res["x_full"] = round(full_ms[n] / ms, 3)
                if best_fwd is None or ms < best_fwd[0]:
                    best_fwd = (ms, n)
                print(json.dumps(res), flush=True)
            else:
                b.launch(lib, fwd_of[d], ptrs)
                ms = do_bench(lambda: b.launch(lib, i, ptrs), warmup=25, rep=200, return_mode="median")
                res = dict(kernel=n, shape=tag, ms=round(ms, 4), tflops=round(2.5 * fl / ms / 1e9, 1))
                if is_sm90(n):
                    res["sm90"] = True
                if "fwd+bwd" in sdpa and best_fwd is not None:
                    # Estimate: the fastest forward of this run + this backward (the delta pass and the dq
                    # conversion, both memory-bound, are not counted).
                    res["x_sdpa_fb"] = round(sdpa["fwd+bwd"] / (best_fwd[0] + ms), 3)
                    res["with_fwd"] = best_fwd[1]
                print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
