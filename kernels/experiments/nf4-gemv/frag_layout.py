#!/usr/bin/env python3
"""frag-gemv.cu's index math on the CPU: the repack, the 256-byte-entry code table and its PRMT address, the lanes'
fragments, mma.sync m16n8k16 (PTX ISA fragment layouts for .bf16 A/B and the f32 C), the load ring across tiles and the
per-tile reduction, emulated lane by lane, warp by warp in lockstep, against W·x in double precision (pure Python: runs anywhere).

    python3 frag_layout.py          # every case must print "ok"; exits 1 otherwise

A mistake in which byte, lane, k-slot, row or tile a value goes to gives errors of the order of the sums themselves,
so the bound (1e-5 of Σ|w·x| with hi + lo codes, 2^-8 with bf16 codes) separates right from wrong by orders of
magnitude. `python3 frag_layout.py --mutate` breaks the layout in four ways and checks that each is caught.
"""
import struct
import sys

import random

# As f32 values (the CUDA table's __constant__ floats).
NF4 = [struct.unpack("<f", struct.pack("<f", v))[0] for v in (
    -1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0)]
MUTATION = None


def f32_bits(f):
    return struct.unpack("<I", struct.pack("<f", f))[0]


def bits_f32(u):
    return struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0]


def bf16_bits(f):
    """Round to nearest even, as __float2bfloat16_rn (finite inputs)."""
    u = f32_bits(f)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def bf16_value(h):
    return bits_f32(h << 16)


def byte_perm(x, y, s):
    src = (x & 0xFFFFFFFF) | (y & 0xFFFFFFFF) << 32
    r = 0
    for i in range(4):
        sel = (s >> (4 * i)) & 7
        r |= ((src >> (8 * sel)) & 0xFF) << (8 * i)
    return r


def stage_table(hl, t32):
    stride, copies = (128, 16 if hl else 32) if t32 else (256, 32)
    table = bytearray(256 * stride)
    for v in range(256):
        a, b = NF4[v >> 4], NF4[v & 15]
        ha, hb = bf16_bits(a), bf16_bits(b)
        hi = ha | hb << 16
        for copy in range(copies):
            if hl:
                ra = a - bf16_value(ha)  # exact in f32: a and its bf16 share the exponent
                rb = b - bf16_value(hb)
                lo = bf16_bits(ra) | bf16_bits(rb) << 16
                struct.pack_into("<II", table, v * stride + 8 * copy, hi, lo)
            else:
                struct.pack_into("<I", table, v * stride + 4 * copy, hi)
    return table


def lut(table, lanesel, word, b, words, t32):
    addr = byte_perm(word, lanesel, 0x7604 + (b << 4))
    if t32:
        addr >>= 1
    return struct.unpack_from("<" + "I" * words, table, addr)


def pair(u):
    """A bf16x2 register: (low half, high half)."""
    return bf16_value(u & 0xFFFF), bf16_value(u >> 16)


def mma(c, a, b):
    """c[lane][4] += A·B for one warp; a[lane] = (a0..a3), b[lane] = (b0, b1), PTX's m16n8k16 .bf16 layouts."""
    A = [[0.0] * 16 for _ in range(16)]
    B = [[0.0] * 8 for _ in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for reg, (row, k) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
            A[row][k], A[row][k + 1] = pair(a[lane][reg])
        for reg, k in enumerate([2 * t, 2 * t + 8]):
            B[k][g], B[k + 1][g] = pair(b[lane][reg])
    C = [[sum(A[r][k] * B[k][n] for k in range(16)) for n in range(8)] for r in range(16)]
    for lane in range(32):
        g, t = lane // 4, lane % 4
        c[lane][0] += C[g][2 * t]
        c[lane][1] += C[g][2 * t + 1]
        c[lane][2] += C[g + 8][2 * t]
        c[lane][3] += C[g + 8][2 * t + 1]


def repack(packed, absmax, qabs, out_f, in_f):
    """frag-gemv.cu's repack kernel: 16 bytes per (chunk, lane), the rows' scales per (chunk, g)."""
    nblk = in_f // 64
    chunks = out_f // 16 * nblk
    wr = bytearray(chunks * 32 * 16)
    sr = [None] * (chunks * 8)
    qr = [None] * (chunks * 8)
    for i in range(chunks * 32):
        lane, chunk = i % 32, i // 32
        g, t = lane // 4, lane % 4
        tile, blk = chunk // nblk, chunk % nblk
        r = tile * 16 + g
        for k in range(16):
            rr = r + (8 if k >= 8 else 0)
            col_byte = 32 * blk + 8 * t + k % 8
            if MUTATION == "row":
                rr = r + (8 if k % 2 else 0)
            wr[16 * i + k] = packed[rr * (in_f // 2) + col_byte]
        if t == 0:
            ga = r * nblk + blk
            sr[chunk * 8 + g] = (absmax[ga], absmax[ga + 8 * nblk])
            qr[chunk * 8 + g] = (qabs[ga], qabs[ga + 8 * nblk])
    return wr, sr, qr


def fma_f32(a, b, c):
    """fmaf: the exact a·b + c (double holds it for these operands) rounded once to f32."""
    return struct.unpack("<f", struct.pack("<f", a * b + c))[0]


def frag_gemv(hl, m, ks, ah, grid, wr, sr, nest, x, out_f, in_f, t32=False):
    """nest: None (plain absmax from sr) or (qr, absmax2, code2, offset), the nested scales."""
    table = stage_table(hl, t32)
    # Each lane's copy in the table (the CUDA's `lanesel`).
    if t32:
        lanesel = [16 * (lane % 16) if hl else 8 * lane for lane in range(32)]
    else:
        lanesel = [8 * lane if hl else 4 * lane for lane in range(32)]
    nblk, tiles = in_f // 64, out_f // 16
    per = nblk // ks
    assert nblk % ks == 0 and per % ah == 0
    y = [[0.0] * out_f for _ in range(m)]
    words = lambda u: list(struct.unpack_from("<4I", wr, 16 * u))
    xbits = [[bf16_bits(v) for v in row] for row in x]

    def x_words(g, t, blk):
        row = xbits[min(g, m - 1)]
        e0 = 64 * blk + 16 * t
        if MUTATION == "x":
            e0 = 64 * blk + 4 * t
        return [row[e0 + 2 * k] | row[e0 + 2 * k + 1] << 16 for k in range(8)]

    for bx in range(grid):
        mine = (tiles - 1 - bx) // grid + 1 if bx < tiles else 0
        total = mine * per
        # Per warp: its ring (w, x, scales per lane) and its counters, run in lockstep (the block barrier).
        warps = []
        first_jump = (grid - 1) * nblk
        for warp in range(ks):
            first = bx * nblk + warp
            warps.append(dict(ring=[None] * ah, pw=first * 32, ps=first * 8, ga=(bx * 16) * nblk + warp, xo=8 * warp,
                              l_c=0, acc=[[0.0] * 4 for _ in range(32)]))

        def load(wp, warp, u):
            # The CUDA's running offsets: pw in 16-byte units (+ lane), ps in (chunk, g) units (+ g), ga the row's scale
            # block index (+ g·nblk), xo in 8-element units of x (+ 2t).
            stage = []
            for lane in range(32):
                g, t = lane // 4, lane % 4
                if nest is None:
                    scales = sr[wp["ps"] + g]
                else:
                    qr, absmax2, code2, offset = nest
                    qg, qh = qr[wp["ps"] + g]
                    ga = wp["ga"] + g * nblk
                    scales = (fma_f32(code2[qg], absmax2[ga // 256], offset),
                              fma_f32(code2[qh], absmax2[(ga + 8 * nblk) // 256], offset))
                stage.append((words(wp["pw"] + lane), x_words(g, t, wp["xo"] // 8), scales))
            wp["ring"][u] = stage
            wp["pw"] += ks * 32
            wp["ps"] += ks * 8
            wp["ga"] += ks
            wp["xo"] += 8 * ks
            wp["l_c"] += 1
            if wp["l_c"] == per:
                wp["l_c"], wp["xo"] = 0, 8 * warp
                wp["pw"] += first_jump * 32
                wp["ps"] += first_jump * 8
                wp["ga"] += (16 * grid - (2 if MUTATION == "jump" else 1)) * nblk

        for warp, wp in enumerate(warps):
            for u in range(ah):
                if u < total:
                    load(wp, warp, u)
        c_tile, c_c, partial = bx, 0, [[[[0.0] * 8 for _ in range(16)] for _ in range(ks)] for _ in range(2)]
        par = 0
        for q0 in range(0, total, ah):
            for u in range(ah):
                for warp, wp in enumerate(warps):
                    stage = wp["ring"][u]
                    if hl:
                        cg = [[0.0] * 4 for _ in range(32)]
                        ch = [[0.0] * 4 for _ in range(32)]
                    else:
                        c = [[0.0] * 4 for _ in range(32)]
                    for j in range(4):
                        a_g, a_h, b = [], [], []
                        for lane in range(32):
                            wv, xw, _ = stage[lane]
                            wg = wv[0] if j < 2 else wv[1]
                            wh = wv[2] if j < 2 else wv[3]
                            bb = 2 * (j % 2)
                            if MUTATION == "byte":
                                bb = j % 2
                            b.append((xw[2 * j], xw[2 * j + 1]))
                            if hl:
                                e0, e1 = lut(table, lanesel[lane], wg, bb, 2, t32), lut(table, lanesel[lane], wg, bb + 1, 2, t32)
                                f0, f1 = lut(table, lanesel[lane], wh, bb, 2, t32), lut(table, lanesel[lane], wh, bb + 1, 2, t32)
                                a_g.append((e0[0], e0[1], e1[0], e1[1]))
                                a_h.append((f0[0], f0[1], f1[0], f1[1]))
                            else:
                                l4 = lambda word, k: lut(table, lanesel[lane], word, k, 1, t32)[0]
                                a_g.append((l4(wg, bb), l4(wh, bb), l4(wg, bb + 1), l4(wh, bb + 1)))
                        if hl:
                            mma(cg, a_g, b)
                            mma(ch, a_h, b)
                        else:
                            mma(c, a_g, b)
                    for lane in range(32):
                        sg, sh = stage[lane][2]
                        acc = wp["acc"][lane]
                        if hl:
                            acc[0] += sg * (cg[lane][0] + cg[lane][2])
                            acc[1] += sg * (cg[lane][1] + cg[lane][3])
                            acc[2] += sh * (ch[lane][0] + ch[lane][2])
                            acc[3] += sh * (ch[lane][1] + ch[lane][3])
                        else:
                            for k in range(4):
                                acc[k] += (sg if k < 2 else sh) * c[lane][k]
                    if q0 + u + ah < total:
                        load(wp, warp, u)
                c_c += 1
                if c_c == per:
                    for warp, wp in enumerate(warps):
                        for lane in range(32):
                            g, t = lane // 4, lane % 4
                            a = wp["acc"][lane]
                            partial[par][warp][g][2 * t], partial[par][warp][g][2 * t + 1] = a[0], a[1]
                            partial[par][warp][g + 8][2 * t], partial[par][warp][g + 8][2 * t + 1] = a[2], a[3]
                            wp["acc"][lane] = [0.0] * 4
                    for tid in range(16 * m):
                        row, n = tid % 16, tid // 16
                        y[n][c_tile * 16 + row] = sum(partial[par][k][row][n] for k in range(ks))
                    par ^= 1
                    c_c = 0
                    c_tile += grid
    return y


def case(seed, hl, m, ks, ah, grid, out_f, in_f, nested=False, t32=False):
    rng = random.Random(seed)
    q = [[rng.randrange(16) for _ in range(in_f)] for _ in range(out_f)]
    packed = bytes(row[e] << 4 | row[e + 1] for row in q for e in range(0, in_f, 2))
    nabs = out_f * in_f // 64
    qabs = [rng.randrange(256) for _ in range(nabs)]
    absmax2 = [bits_f32(f32_bits(rng.uniform(0.002, 0.003))) for _ in range((nabs + 255) // 256)]
    code2 = [(i - 127.5) / 128 for i in range(256)]
    offset = 0.75
    if nested:  # the absmax the nested bytes stand for, as frag-gemv.cu's host computes its reference's
        absmax = [fma_f32(code2[qabs[i]], absmax2[i // 256], offset) for i in range(nabs)]
    else:
        absmax = [bits_f32(f32_bits(rng.uniform(0.5, 1.5))) for _ in range(nabs)]
    x = [[bf16_value(bf16_bits(rng.uniform(-1, 1))) for _ in range(in_f)] for _ in range(m)]
    w = [[NF4[q[o][i]] * absmax[(o * in_f + i) // 64] for i in range(in_f)] for o in range(out_f)]
    wr, sr, qr = repack(packed, absmax, qabs, out_f, in_f)
    nest = (qr, absmax2, code2, offset) if nested else None
    y = frag_gemv(hl, m, ks, ah, grid, wr, sr, nest, x, out_f, in_f, t32)
    err = 0.0
    for n in range(m):
        for o in range(out_f):
            ref = sum(w[o][i] * x[n][i] for i in range(in_f))
            scale = sum(abs(w[o][i] * x[n][i]) for i in range(in_f))
            err = max(err, abs(y[n][o] - ref) / scale)
    bound = 1e-5 if hl else 2.0 ** -8
    name = f"hl={hl} m={m} ks={ks} ah={ah} grid={grid} {out_f}x{in_f}{' nested' if nested else ''}{' T32' if t32 else ''}"
    print(f"{name:44s} max err/Σ|wx| {err:.1e} (bound {bound:.0e}) {'ok' if err < bound else 'FAIL'}")
    return err < bound


CASES = [
    # (seed, hl, m, ks, ah, grid, out, in): several tiles per block (the ring crosses tiles), grids that do not divide
    # the tiles, and 1, 3 and 8 rows of x.
    (1, 1, 1, 2, 2, 1, 48, 256),
    (2, 0, 1, 2, 2, 2, 48, 256),
    (3, 1, 3, 1, 2, 2, 32, 128),
    (4, 1, 8, 2, 1, 3, 64, 256),
    (5, 0, 8, 4, 1, 1, 16, 256),
    # nested scales, absmax2 groups of 256 scale blocks crossing rows g and g + 8 and the tiles
    (6, 1, 1, 2, 2, 2, 96, 512, True),
    (7, 0, 2, 1, 4, 3, 80, 256, True),
    # the 32 KB table
    (8, 1, 1, 2, 2, 2, 48, 256, True, True),
    (9, 0, 8, 2, 2, 1, 32, 256, False, True),
]


def main():
    global MUTATION
    if "--mutate" in sys.argv:
        caught = 0
        for MUTATION in ("row", "x", "byte", "jump"):
            ok = case(*(CASES[5] if MUTATION == "jump" else CASES[0]))
            print(f"mutation {MUTATION}: {'caught' if not ok else 'NOT caught'}")
            caught += not ok
        sys.exit(0 if caught == 4 else 1)
    sys.exit(0 if all([case(*c) for c in CASES]) else 1)


if __name__ == "__main__":
    main()
