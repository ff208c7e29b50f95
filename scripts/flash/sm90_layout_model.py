"""CPU model of the index math in kernels/cuda/flash_wgmma.cuh (no GPU needed): python3 scripts/flash/sm90_layout_model.py

Transcribes the header's address functions (sw128, desc_k, desc_mn, the loader's thread → chunk mapping, the epilogue's
fragment stores) and checks them against an independent model of what wgmma reads, written from the PTX ISA /
CUTLASS canonical layouts:
  * descriptor: start = bits 0-13 (<<4), LBO = bits 16-29 (<<4), SBO = bits 32-45 (<<4), swizzle = bits 62-63 (1 = 128B);
  * 128-byte swizzle acts on the final byte address: bits [4,7) ^= bits [7,10);
  * K-major, swizzled: element (row m, k) of a 16-wide k-slice at start + (m // 8)·SBO + (m % 8)·128 + (k // 8)·16
    + (k % 8)·2, then swizzled (CUTLASS ((8,m),2):((8T,SBO),(1,T)) in uint128 units, LBO unused);
  * MN-major, swizzled: element (k, n) at start + (n // 64)·LBO + (k // 8)·SBO + (k % 8)·128 + ((n % 64) // 8)·16
    + (n % 8)·2, then swizzled (CUTLASS ((T,8,n),(8,k)):((1,T,LBO),(8T,SBO))).
  * accumulator d[4j + e] of warp w, lane (g, t): (16w + g + 8·(e // 2), 8j + 2t + e % 2) (CLayout_64xN);
    A register r of warp w: (16w + g + 8·(r % 2), 8·(r // 2) + 2t + {0, 1}) (ALayout_64x16).
Every check prints OK or raises.
"""
import random

# ---- transcriptions of the header ----------------------------------------------------------------------------


def sw128(rows, r, k8):
    return (k8 >> 3) * (rows * 128) + r * 128 + (((k8 & 7) ^ (r & 7)) << 4)


def desc_sw128(addr, lbo):
    return ((addr & 0x3FFFF) >> 4) | (((lbo >> 4) & 0x3FFF) << 16) | ((1024 >> 4) << 32) | (1 << 62)


def desc_k(rows, tile, row0, kk):
    return desc_sw128(tile + (kk >> 2) * (rows * 128) + row0 * 128 + (kk & 3) * 32, 16)


def desc_mn(rows, tile, kk):
    return desc_sw128(tile + kk * 2048, rows * 128)


def load_tile_addresses(rows, d, nt):
    """(row, k8) → shared byte offset written by sm90_load_tile, for every thread, both code paths."""
    ch = d // 8
    out = {}
    if nt % ch == 0 and (nt // ch) % 8 == 0:
        rs = nt // ch
        it = (rows + rs - 1) // rs
        for tid in range(nt):
            k8, rb = tid % ch, tid // ch
            d0 = sw128(rows, rb, k8)
            for i in range(it):
                r = rb + i * rs
                if (i + 1) * rs <= rows or r < rows:
                    assert (r, k8) not in out
                    out[(r, k8)] = d0 + i * rs * 128
    else:
        for tid in range(nt):
            for c in range(tid, rows * ch, nt):
                r, k8 = c // ch, c % ch
                assert (r, k8) not in out
                out[(r, k8)] = sw128(rows, r, k8)
    assert len(out) == rows * ch, "every chunk written once"
    return out


# ---- independent hardware model --------------------------------------------------------------------------------


def swz(addr):
    return addr ^ (((addr >> 7) & 7) << 4)


def decode(desc):
    start = (desc & 0x3FFF) << 4
    lbo = ((desc >> 16) & 0x3FFF) << 4
    sbo = ((desc >> 32) & 0x3FFF) << 4
    assert (desc >> 62) == 1 and ((desc >> 49) & 7) == 0
    return start, lbo, sbo


def hw_k_major(desc, rows):
    """{(m, k): byte address} that wgmma reads for a K-major operand of `rows` rows and 16 k."""
    start, _, sbo = decode(desc)
    return {(m, k): swz(start + (m // 8) * sbo + (m % 8) * 128 + (k // 8) * 16 + (k % 8) * 2) for m in range(rows) for k in range(16)}


def hw_mn_major(desc, n_cols):
    start, lbo, sbo = decode(desc)
    return {(k, n): swz(start + (n // 64) * lbo + (k // 8) * sbo + (k % 8) * 128 + ((n % 64) // 8) * 16 + (n % 8) * 2)
            for k in range(16) for n in range(n_cols)}


# ---- checks ------------------------------------------------------------------------------------------------------


def element_addr(chunks, base, r, c):
    return base + chunks[(r, c // 8)] + 2 * (c % 8)


def check_k_operand(rows, d, nt, base, row0, m_rows):
    """The loader writes element (r, c) where wgmma (K-major, rows row0 … row0 + m_rows) expects it."""
    chunks = load_tile_addresses(rows, d, nt)
    for kk in range(d // 16):
        hw = hw_k_major(desc_k(rows, base, row0, kk), m_rows)
        for (m, k), a in hw.items():
            assert a == element_addr(chunks, base, row0 + m, 16 * kk + k), (rows, d, kk, m, k)


def check_mn_operand(rows, d, nt, base):
    """V: tile [rows = keys][d]; wgmma MN-major reads (k = key, n = column)."""
    chunks = load_tile_addresses(rows, d, nt)
    for kk in range(rows // 16):
        hw = hw_mn_major(desc_mn(rows, base, kk), d)
        for (k, n), a in hw.items():
            assert a == element_addr(chunks, base, 16 * kk + k, n), (rows, d, kk, k, n)


def check_fragments(n):
    """P packed from the score accumulator (pf[kk][r] = pack(s[8kk + 2r], s[8kk + 2r + 1])) is the A fragment of the
    k-step kk; O staged (st_shared_u32 at sw128(r, j) + 4t) lands where sm90_store_rows reads row r, column 8j + 2t."""
    for w in range(4):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            acc = {}
            for i in range(n // 2):
                j, e = i // 4, i % 4
                acc[i] = (16 * w + g + 8 * (e // 2), 8 * j + 2 * t + e % 2)
            for kk in range(n // 16):
                for r in range(4):
                    want = [(16 * w + g + 8 * (r % 2), 16 * kk + 8 * (r // 2) + 2 * t + x) for x in range(2)]
                    got = [acc[8 * kk + 2 * r], acc[8 * kk + 2 * r + 1]]
                    assert want == got, (w, lane, kk, r)


def check_epilogue(bm, d):
    # Writers: thread (warp, g, t), half hr, column block j (8 columns): 4 bytes at sw128(r, j) + 4t holding columns
    # 8j + 2t, +1 of row r = 16·warp + g + 8·hr. Reader (sm90_store_rows): 16 bytes at sw128(r, k8) = columns 8·k8 ….
    written = {}
    for warp in range(bm // 16):
        for lane in range(32):
            g, t = lane // 4, lane % 4
            for hr in range(2):
                r = 16 * warp + g + 8 * hr
                for j in range(d // 8):
                    a = sw128(bm, r, j) + 4 * t
                    for x in range(2):
                        written[a + 2 * x] = (r, 8 * j + 2 * t + x)
    for r in range(bm):
        for k8 in range(d // 8):
            a = sw128(bm, r, k8)
            for x in range(8):
                assert written[a + 2 * x] == (r, 8 * k8 + x)
    # Bank conflicts of the staging stores: a warp's 32 lanes for fixed (hr, j) hit 32 distinct banks.
    for warp in range(bm // 16):
        for hr in range(2):
            for j in range(d // 8):
                banks = set()
                for lane in range(32):
                    g, t = lane // 4, lane % 4
                    banks.add(((sw128(bm, 16 * warp + g + 8 * hr, j) + 4 * t) // 4) % 32)
                assert len(banks) == 32


def check_split_backward(d):
    """flash_backward_sm90_split (two warpgroups on one 64-key tile): Q rows 32w … as the N = 32 B operand of Sᵀ; the
    Pᵀ/dSᵀ stores (warpgroup w, queries 32w …) read back as dV's/dK's K-major A and dQ's M-major A; the dO/Q/K column
    slices c0 = (d/2)·w as N-major B operands of N = d/2."""
    for w in range(2):
        check_k_operand(64, d, 256, 0x400, 32 * w, 32)
    written = {}
    for w in range(2):
        for warp in range(4):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                kr0 = 16 * warp + g
                row = kr0 * 128 + (g << 4) + 4 * t
                for hr in range(2):
                    for j in range(4):
                        a = (row + hr * 1024) ^ ((4 * w + j) << 4)
                        assert a == sw128(64, kr0 + 8 * hr, 4 * w + j) + 4 * t
                        for x in range(2):
                            assert a + 2 * x not in written
                            written[a + 2 * x] = (kr0 + 8 * hr, 32 * w + 8 * j + 2 * t + x)
    assert len(written) == 64 * 64
    for kk in range(4):
        for (m, k), a in hw_k_major(desc_k(64, 0, 0, kk), 64).items():  # A = Pᵀ: m = key, k = query
            assert written[a] == (m, 16 * kk + k)
        for (k, n), a in hw_mn_major(desc_mn(64, 0, kk), 64).items():  # A = dS (trans): k = key, n = query
            assert written[a] == (16 * kk + k, n)
    chunks = load_tile_addresses(64, d, 256)
    for w in range(2):
        c0 = (d // 2) * w
        for kk in range(4):
            for (k, n), a in hw_mn_major(desc_sw128(0x400 + (c0 // 64) * (64 * 128) + kk * 2048, 64 * 128), d // 2).items():
                assert a == element_addr(chunks, 0x400, 16 * kk + k, c0 + n)


def main():
    random.seed(0)
    base = 0x400  # any 1024-aligned tile base
    for d in (64, 128, 256):
        for nwg in (1, 2, 3):
            bm = 64 * nwg
            for nt in (128 * nwg, 128):  # all threads (fwd90) or the producer warpgroup (fwd90ws)
                for wg in range(nwg):
                    check_k_operand(bm, d, nt, base, 64 * wg, 64)  # Q: A operand, this warpgroup's 64 rows
        for bn in (64, 80, 96, 128, 192):
            for nt in (128, 256, 384):
                check_k_operand(bn, d, nt, base + 3 * 1024, 0, bn)  # K: B operand, N = bn rows
                check_mn_operand(bn, d, nt, base + 5 * 1024)  # V: B operand, transposed
    print("loader / descriptor consistency: OK")
    for n in (64, 80, 128, 192, 256):
        check_fragments(n)
    print("accumulator → A fragment (P): OK")
    for nwg in (1, 2, 3):
        for d in (64, 128, 256):
            check_epilogue(64 * nwg, d)
    print("epilogue staging (and its bank spread): OK")
    for d in (128, 256):
        check_split_backward(d)
    print("split backward (Pᵀ/dSᵀ stores, column slices): OK")


if __name__ == "__main__":
    main()
