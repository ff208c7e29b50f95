//! Scaled dot-product attention over packed variable-length sequences: the CPU specification that the CUDA
//! flash-attention kernel is tested against.
//!
//! One op covers what the supported models need: causal masking, GQA, packed sequences (`cu_seqlens`, as in
//! FlashAttention's varlen API and transformers' padding-free training), Gemma's sliding window and logit softcap.
//! It is deliberately the plain O(len_q·len_k) algorithm per sequence and head. It follows FlashAttention only in
//! what it remembers: forward saves the per-query log-sum-exp, and backward recomputes the probabilities from it,
//! so the CUDA kernel and this reference exchange the same saved tensors.
//!
//! Every output element is produced by one rayon task in a fixed order, so results are bit-identical for any
//! thread count.

use rayon::prelude::*;

use crate::Float;

/// Attention geometry and masking. GQA: query head h uses KV head h / (n_heads / n_kv_heads) (n_heads must be a multiple of n_kv_heads),
/// as transformers' repeat_kv does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k before softcapping (1/√head_dim for Llama; query_pre_attn_scalar^-½ for Gemma 2/3).
    pub scale: f64,
    pub causal: bool,
    /// Key j is visible to query at absolute position i only if i − j < window (Gemma 2/3 local layers). None = unlimited.
    pub sliding_window: Option<usize>,
    /// Scores become cap·tanh(s/cap) after scaling and before masking (Gemma 2: 50). None = off.
    pub softcap: Option<f64>,
}

impl AttentionParams {
    /// Full attention of this geometry at the usual scale 1/√head_dim: not causal, no window, no softcap.
    pub fn new(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        AttentionParams {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            causal: false,
            sliding_window: None,
            softcap: None,
        }
    }
}

/// `cu_seqlens_q` and `cu_seqlens_k` of packed sequences with these (queries, keys) lengths: running sums from 0.
pub fn cu_seqlens(lens: &[(usize, usize)]) -> (Vec<i32>, Vec<i32>) {
    let (mut cu_q, mut cu_k) = (vec![0], vec![0]);
    let (mut tq, mut tk) = (0, 0);
    for &(q, k) in lens {
        (tq, tk) = (tq + q as i32, tk + k as i32);
        cu_q.push(tq);
        cu_k.push(tk);
    }
    (cu_q, cu_k)
}

/// Packed variable-length attention. Sequence s owns query rows cu_seqlens_q\[s\]..cu_seqlens_q[s+1] and key rows
/// cu_seqlens_k\[s\]..cu_seqlens_k[s+1]; tokens never attend across sequences.
/// When a sequence has fewer queries than keys (decoding with a KV cache), queries are aligned to the END of the keys
/// (bottom-right, as FlashAttention does): query r of a sequence with len_q queries and len_k keys sits at absolute
/// position i = r + len_k − len_q, and with `causal` sees keys j ≤ i.
/// q: [tq, n_heads, head_dim], k, v: [tk, n_kv_heads, head_dim], cu_seqlens = [cu_seqlens_q, cu_seqlens_k]:
/// [n_seqs + 1] each (first 0, last tq / tk) → out: [tq, n_heads, head_dim], lse: [tq, n_heads] (natural-log
/// log-sum-exp of the scaled, capped, masked scores; −∞ for a query that sees no key, whose output row is then all
/// zeros). The CUDA twin takes the same arguments (and each sequence's longest length).
pub fn attention_forward<T: Float>(
    p: &AttentionParams,
    q: &[T],
    k: &[T],
    v: &[T],
    [cu_seqlens_q, cu_seqlens_k]: [&[i32]; 2],
    out: &mut [T],
    lse: &mut [T],
) {
    let geo = Geometry::new(p, cu_seqlens_q, cu_seqlens_k);
    geo.assert_len("q", q, geo.tq * p.n_heads);
    geo.assert_len("k", k, geo.tk * p.n_kv_heads);
    geo.assert_len("v", v, geo.tk * p.n_kv_heads);
    geo.assert_len("out", out, geo.tq * p.n_heads);
    assert_eq!(lse.len(), geo.tq * p.n_heads, "lse length");

    out.par_chunks_mut(p.head_dim).zip(lse.par_iter_mut()).enumerate().for_each(|(row, (o, l))| {
        let scores = geo.visible_scores(q, k, row);
        let kv = geo.kv_head(row);
        o.fill(T::zero());
        let m = scores.iter().fold(T::neg_infinity(), |m, &(_, s)| m.max(s));
        if m == T::neg_infinity() {
            *l = m;
            return;
        }
        let sum: T = scores.iter().map(|&(_, s)| (s - m).exp()).sum();
        *l = m + sum.ln();
        // exp(s − lse) rather than exp(s − m)/sum: the exact expression backward recomputes.
        for &(key, s) in &scores {
            axpy(o, (s - *l).exp(), geo.row(v, geo.kv_row(key, kv)));
        }
    });
}

/// Gradients of attention_forward from [q, k, v], [out, d_out] (out and lse the forward's outputs; d_out: [tq,
/// n_heads, head_dim]) and cu_seqlens as there → [dq: [tq, n_heads, head_dim], dk, dv: [tk, n_kv_heads, head_dim]] (all
/// written; GQA sums over the query heads that share a KV head).
pub fn attention_backward<T: Float>(
    p: &AttentionParams,
    [q, k, v]: [&[T]; 3],
    [out, d_out]: [&[T]; 2],
    lse: &[T],
    [cu_seqlens_q, cu_seqlens_k]: [&[i32]; 2],
    [dq, dk, dv]: [&mut [T]; 3],
) {
    let geo = Geometry::new(p, cu_seqlens_q, cu_seqlens_k);
    let hd = p.head_dim;
    for (name, x) in [("q", q), ("out", out), ("d_out", d_out), ("dq", &*dq)] {
        geo.assert_len(name, x, geo.tq * p.n_heads);
    }
    for (name, x) in [("k", k), ("v", v), ("dk", &*dk), ("dv", &*dv)] {
        geo.assert_len(name, x, geo.tk * p.n_kv_heads);
    }
    assert_eq!(lse.len(), geo.tq * p.n_heads, "lse length");

    // D_i = dO_i·O_i equals Σ_j P_ij·dP_ij (softmax's Jacobian term), computed once per query row instead of per key.
    let delta: Vec<T> = d_out.par_chunks(hd).zip(out.par_chunks(hd)).map(|(d, o)| dot(d, o)).collect();

    dq.par_chunks_mut(hd).enumerate().for_each(|(row, dq_row)| {
        let kv = geo.kv_head(row);
        let d_o = geo.row(d_out, row);
        dq_row.fill(T::zero());
        for (key, s) in geo.visible_scores(q, k, row) {
            let prob = (s - lse[row]).exp();
            let ds = geo.d_raw_score(s, prob, dot(d_o, geo.row(v, geo.kv_row(key, kv))), delta[row]);
            axpy(dq_row, ds, geo.row(k, geo.kv_row(key, kv)));
        }
    });

    // One task per key row and KV head gathers over every (query head of its group, query) pair that sees it, so the
    // GQA and query sums are never split across threads.
    dk.par_chunks_mut(hd).zip(dv.par_chunks_mut(hd)).enumerate().for_each(|(kv_row, (dk_row, dv_row))| {
        let (key, kv) = (kv_row / p.n_kv_heads, kv_row % p.n_kv_heads);
        let seq = geo.seq_of(geo.cu_k, key);
        let j = key - seq.k0;
        let (k_j, v_j) = (geo.row(k, kv_row), geo.row(v, kv_row));
        dk_row.fill(T::zero());
        dv_row.fill(T::zero());
        for h in kv * geo.group..(kv + 1) * geo.group {
            for r in (0..seq.len_q).filter(|&r| geo.visible(seq, r, j)) {
                let row = (seq.q0 + r) * p.n_heads + h;
                let (q_i, d_o) = (geo.row(q, row), geo.row(d_out, row));
                let s = geo.score(q_i, k_j);
                let prob = (s - lse[row]).exp();
                let ds = geo.d_raw_score(s, prob, dot(d_o, v_j), delta[row]);
                axpy(dv_row, prob, d_o);
                axpy(dk_row, ds, q_i);
            }
        }
    });
}

/// One packed sequence: where its query and key rows start, and how many of each.
#[derive(Clone, Copy)]
struct Seq {
    q0: usize,
    k0: usize,
    len_q: usize,
    len_k: usize,
}

/// Validated parameters and the masking and scoring rules both passes share.
struct Geometry<'a, T> {
    p: &'a AttentionParams,
    cu_q: &'a [i32],
    cu_k: &'a [i32],
    tq: usize,
    tk: usize,
    group: usize,
    scale: T,
    cap: Option<T>,
}

impl<'a, T: Float> Geometry<'a, T> {
    fn new(p: &'a AttentionParams, cu_q: &'a [i32], cu_k: &'a [i32]) -> Self {
        assert!(
            p.n_kv_heads > 0 && p.n_heads > 0 && p.n_heads % p.n_kv_heads == 0,
            "n_heads {} must be a positive multiple of n_kv_heads {}",
            p.n_heads,
            p.n_kv_heads
        );
        assert!(p.head_dim > 0, "head_dim must be positive");
        assert!(p.sliding_window != Some(0), "a sliding window of 0 hides every key");
        if let Some(cap) = p.softcap {
            assert!(cap > 0.0, "softcap {cap} must be positive");
        }
        assert_eq!(cu_q.len(), cu_k.len(), "cu_seqlens_q and cu_seqlens_k must describe the same number of sequences");
        for cu in [cu_q, cu_k] {
            assert!(!cu.is_empty() && cu[0] == 0, "cu_seqlens must start at 0: {cu:?}");
            assert!(cu.windows(2).all(|w| w[0] <= w[1]), "cu_seqlens must be non-decreasing: {cu:?}");
        }
        if p.causal {
            // A causal query left of every key would see nothing; FlashAttention's bottom-right alignment forbids it.
            for s in 0..cu_q.len() - 1 {
                let (len_q, len_k) = (cu_q[s + 1] - cu_q[s], cu_k[s + 1] - cu_k[s]);
                assert!(len_q <= len_k, "causal sequence {s} has {len_q} queries but only {len_k} keys");
            }
        }
        Geometry {
            p,
            cu_q,
            cu_k,
            tq: *cu_q.last().unwrap() as usize, // non-empty and ≥ 0: asserted above
            tk: *cu_k.last().unwrap() as usize,
            group: p.n_heads / p.n_kv_heads,
            scale: T::c(p.scale),
            cap: p.softcap.map(T::c),
        }
    }

    /// `rows` rows of head_dim elements.
    fn assert_len(&self, name: &str, x: &[T], rows: usize) {
        assert_eq!(
            x.len(),
            rows * self.p.head_dim,
            "{name} length (cu_seqlens give {} queries, {} keys)",
            self.tq,
            self.tk
        );
    }

    /// The head_dim-vector at a flat row (token·heads + head) of a [tokens, heads, head_dim] tensor.
    fn row<'x>(&self, x: &'x [T], flat_row: usize) -> &'x [T] {
        &x[flat_row * self.p.head_dim..][..self.p.head_dim]
    }

    /// The flat row of key token `key`, KV head `kv` in k and v.
    fn kv_row(&self, key: usize, kv: usize) -> usize {
        key * self.p.n_kv_heads + kv
    }

    fn kv_head(&self, q_row: usize) -> usize {
        (q_row % self.p.n_heads) / self.group
    }

    /// The sequence owning token `t` under `cu` (empty sequences own nothing, so the last start ≤ t is the owner).
    fn seq_of(&self, cu: &[i32], t: usize) -> Seq {
        let s = cu.partition_point(|&c| c as usize <= t) - 1;
        let (q0, k0) = (self.cu_q[s] as usize, self.cu_k[s] as usize);
        Seq { q0, k0, len_q: self.cu_q[s + 1] as usize - q0, len_k: self.cu_k[s + 1] as usize - k0 }
    }

    /// Whether query r of `seq` sees the sequence's key j. Positions are signed: a non-causal sequence with more
    /// queries than keys puts its first queries before position 0.
    fn visible(&self, seq: Seq, r: usize, j: usize) -> bool {
        let i = r as i64 + seq.len_k as i64 - seq.len_q as i64;
        let j = j as i64;
        (!self.p.causal || j <= i) && self.p.sliding_window.is_none_or(|w| i - j < w as i64)
    }

    fn score(&self, q: &[T], k: &[T]) -> T {
        let s = self.scale * dot(q, k);
        self.cap.map_or(s, |cap| cap * (s / cap).tanh())
    }

    /// (global key row, capped score) for every key the query row (token·n_heads + head) sees, in key order.
    fn visible_scores(&self, q: &[T], k: &[T], q_row: usize) -> Vec<(usize, T)> {
        let t = q_row / self.p.n_heads;
        let seq = self.seq_of(self.cu_q, t);
        let (q_i, kv) = (self.row(q, q_row), self.kv_head(q_row));
        (0..seq.len_k)
            .filter(|&j| self.visible(seq, t - seq.q0, j))
            .map(|j| (seq.k0 + j, self.score(q_i, self.row(k, self.kv_row(seq.k0 + j, kv)))))
            .collect()
    }

    /// ∂loss/∂(q·k) from a capped score s, its probability and dP = dO·v: softmax's P(dP − D), then tanh's
    /// 1 − tanh² = 1 − (s/cap)², then the scale.
    fn d_raw_score(&self, s: T, prob: T, dp: T, delta: T) -> T {
        let ds = prob * (dp - delta);
        let ds = self.cap.map_or(ds, |cap| ds * (T::one() - (s / cap) * (s / cap)));
        ds * self.scale
    }
}

fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |acc, (&x, &y)| acc + x * y)
}

/// y += a·x
fn axpy<T: Float>(y: &mut [T], a: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::attention::{case, AttentionCase as Case};
    use crate::testing::{assert_close, check_gradient, f32s, f64s, Tolerance};

    /// Two f64 evaluations of the same formula that differ only in summation order.
    const F64: Tolerance = Tolerance { abs: 1e-12, rel: 1e-12 };

    const PACKED: &[(usize, usize)] = &[(1, 1), (4, 4), (6, 6)];
    const DECODE: &[(usize, usize)] = &[(2, 5)];

    /// Small enough for finite differences; together they cover single and packed batches, GQA ratios 1, 2, 3,
    /// odd head_dim, causal and not, windows 2 and 3, caps 0.5 (saturating) and 50 (Gemma 2), bottom-right decoding,
    /// a non-causal sequence with more queries than keys and one with no keys at all.
    const SMALL: &[Case] = &[
        case((1, 1), 4, true, None, None, &[(7, 7)]),
        case((4, 2), 5, true, None, None, PACKED),
        case((6, 2), 4, true, Some(2), Some(50.0), PACKED),
        case((3, 3), 8, false, None, Some(0.5), PACKED),
        case((4, 2), 5, true, Some(3), None, DECODE),
        case((6, 2), 4, true, Some(3), Some(0.5), &[(2, 5), (3, 3), (1, 4)]),
        case((4, 2), 5, false, Some(2), None, &[(3, 2), (2, 0), (4, 4)]),
        case((1, 1), 8, false, None, Some(50.0), &[(5, 5)]),
        case((3, 1), 8, true, None, Some(50.0), &[(2, 5), (1, 3)]),
    ];

    /// Long enough that rayon splits the work and windows cut deep into sequences.
    const LARGE: Case = case((8, 2), 16, true, Some(7), Some(50.0), &[(19, 19), (5, 23), (40, 40)]);

    /// transformers' eager attention with the packed batch as one row: K and V expanded to every query head as
    /// repeat_kv does, a dense [tq, tk] score matrix per head, softcap, then an additive −∞ mask built from each
    /// token's sequence id and absolute position.
    fn dense_reference(c: &Case, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let (n_heads, n_kv, d, tq, tk) = (c.heads.0, c.heads.1, c.head_dim, c.tq(), c.tk());
        let (mut q_pos, mut k_pos) = (vec![], vec![]);
        for (s, &(len_q, len_k)) in c.lens.iter().enumerate() {
            q_pos.extend((0..len_q).map(|r| (s, (len_k + r) as i64 - len_q as i64)));
            k_pos.extend((0..len_k).map(|j| (s, j as i64)));
        }
        let mask: Vec<Vec<f64>> = q_pos
            .iter()
            .map(|&(sq, i)| {
                k_pos
                    .iter()
                    .map(|&(sk, j)| {
                        let seen = sq == sk && !(c.causal && j > i) && c.window.is_none_or(|w| i - j < w as i64);
                        if seen {
                            0.0
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect()
            })
            .collect();
        let repeat_kv = |x: &[f64]| -> Vec<Vec<f64>> {
            (0..n_kv)
                .flat_map(|kv| std::iter::repeat_n(kv, n_heads / n_kv))
                .map(|kv| (0..tk).flat_map(|t| x[(t * n_kv + kv) * d..][..d].to_vec()).collect())
                .collect()
        };
        let (k_heads, v_heads) = (repeat_kv(k), repeat_kv(v));
        let scale = c.params().scale;
        let (mut out, mut lse) = (vec![0.0; tq * n_heads * d], vec![f64::NEG_INFINITY; tq * n_heads]);
        for h in 0..n_heads {
            for t in 0..tq {
                let qv = &q[(t * n_heads + h) * d..][..d];
                let scores: Vec<f64> = (0..tk)
                    .map(|u| {
                        let s = scale * (0..d).map(|e| qv[e] * k_heads[h][u * d + e]).sum::<f64>();
                        c.softcap.map_or(s, |cap| (s / cap).tanh() * cap) + mask[t][u]
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                lse[t * n_heads + h] = m + z.ln();
                for u in 0..tk {
                    for x in 0..d {
                        out[(t * n_heads + h) * d + x] += e[u] / z * v_heads[h][u * d + x];
                    }
                }
            }
        }
        (out, lse)
    }

    /// assert_close that also accepts −∞ exactly where expected has −∞.
    #[track_caller]
    fn assert_close_lse(what: &str, actual: &[f64], expected: &[f64], tol: Tolerance) {
        let inf = |x: &[f64]| x.iter().map(|v| *v == f64::NEG_INFINITY).collect::<Vec<_>>();
        assert_eq!(inf(actual), inf(expected), "{what}: positions of −∞");
        let finite = |x: &[f64]| x.iter().map(|&v| if v == f64::NEG_INFINITY { 0.0 } else { v }).collect::<Vec<_>>();
        assert_close(what, &finite(actual), &finite(expected), tol);
    }

    #[test]
    fn forward_matches_dense_masked_reference() {
        for (n, c) in SMALL.iter().chain([&LARGE]).enumerate() {
            let [q, k, v, _] = c.inputs(n as u64);
            let (out, lse) = c.forward(&q, &k, &v);
            let (want_out, want_lse) = dense_reference(c, &q, &k, &v);
            assert_close(&format!("out {c:?}"), &out, &want_out, F64);
            assert_close_lse(&format!("lse {c:?}"), &lse, &want_lse, F64);
        }
    }

    /// With q = 0 every visible key scores 0, so out is the mean of the visible v and lse = ln(count); v holds each
    /// key's global row, so out names exactly which keys a query saw.
    #[test]
    fn masks_by_hand() {
        let ln = f64::ln;
        let check = |c: Case, out: &[f64], lse: &[f64]| {
            let v: Vec<f64> = (0..c.tk()).map(|j| j as f64).collect();
            let (got_out, got_lse) = c.forward(&vec![0.0; c.tq()], &v, &v);
            assert_close(&format!("out {c:?}"), &got_out, out, F64);
            assert_close_lse(&format!("lse {c:?}"), &got_lse, lse, F64);
        };
        // Bottom-right: the first sequence's 3 queries sit at positions 2, 3, 4 and each sees itself and one key back;
        // the second sequence's query sees only its own key (row 5).
        check(
            case((1, 1), 1, true, Some(2), None, &[(3, 5), (1, 1)]),
            &[1.5, 2.5, 3.5, 5.0],
            &[ln(2.0), ln(2.0), ln(2.0), 0.0],
        );
        check(case((1, 1), 1, true, None, None, DECODE), &[1.5, 2.0], &[ln(4.0), ln(5.0)]);
        check(case((1, 1), 1, true, Some(1), None, &[(3, 3)]), &[0.0, 1.0, 2.0], &[0.0; 3]);
        // Non-causal windows only look back; queries of the third sequence sit at positions −1, 0, 1 and see both keys.
        check(
            case((1, 1), 1, false, Some(2), None, &[(2, 3), (2, 0), (3, 2)]),
            &[1.0, 1.5, 0.0, 0.0, 3.5, 3.5, 3.5],
            &[ln(3.0), ln(2.0), f64::NEG_INFINITY, f64::NEG_INFINITY, ln(2.0), ln(2.0), ln(2.0)],
        );
    }

    #[test]
    fn backward_matches_finite_differences() {
        for (n, c) in SMALL.iter().enumerate() {
            let [q, k, v, g] = c.inputs(100 + n as u64);
            let [_, _, dq, dk, dv] = c.forward_backward(&q, &k, &v, &g);
            let loss = |q: &[f64], k: &[f64], v: &[f64]| crate::testing::dot(&c.forward(q, k, v).0, &g);
            check_gradient(&format!("dq {c:?}"), &q, &dq, |x| loss(x, &k, &v));
            check_gradient(&format!("dk {c:?}"), &k, &dk, |x| loss(&q, x, &v));
            check_gradient(&format!("dv {c:?}"), &v, &dv, |x| loss(&q, &k, x));
        }
    }

    #[test]
    fn query_that_sees_no_key_outputs_zero_and_gets_zero_gradient() {
        let c = SMALL[6];
        assert_eq!(c.lens[1], (2, 0));
        let [q, k, v, g] = c.inputs(7);
        let [out, lse, dq, dk, dv] = c.forward_backward(&q, &k, &v, &g);
        let row = c.heads.0 * c.head_dim;
        assert!(out[3 * row..5 * row].iter().all(|&x| x == 0.0));
        assert!(lse[3 * c.heads.0..5 * c.heads.0].iter().all(|&x| x == f64::NEG_INFINITY));
        assert!(dq[3 * row..5 * row].iter().all(|&x| x == 0.0));
        assert!([out, dq, dk, dv].iter().flatten().all(|x| x.is_finite()));
    }

    #[test]
    #[should_panic(expected = "causal sequence 1 has 3 queries but only 2 keys")]
    fn causal_query_before_every_key_is_rejected() {
        let c = case((1, 1), 4, true, None, None, &[(2, 2), (3, 2)]);
        let [q, k, v, _] = c.inputs(0);
        c.forward(&q, &k, &v);
    }

    #[test]
    #[should_panic(expected = "q length")]
    fn cu_seqlens_disagreeing_with_q_is_rejected() {
        let c = case((1, 1), 4, true, None, None, &[(2, 2)]);
        let [q, k, v, _] = c.inputs(0);
        let (mut out, mut lse) = (vec![0.0; 8], vec![0.0; 2]);
        attention_forward(&c.params(), &q[..4], &k, &v, [&[0, 2], &[0, 2]], &mut out, &mut lse);
    }

    #[test]
    fn packed_batch_equals_each_sequence_alone() {
        let c = SMALL[5];
        let [q, k, v, g] = c.inputs(11);
        let packed = c.forward_backward(&q, &k, &v, &g);
        let (q_row, kv_row) = (c.heads.0 * c.head_dim, c.heads.1 * c.head_dim);
        let (cu_q, cu_k) = c.cu_seqlens();
        let lens: &'static [(usize, usize)] = c.lens;
        for s in 0..lens.len() {
            let alone = Case { lens: std::slice::from_ref(&lens[s]), ..c };
            let (qs, ks) = (cu_q[s] as usize..cu_q[s + 1] as usize, cu_k[s] as usize..cu_k[s + 1] as usize);
            let rows = |r: &std::ops::Range<usize>, width: usize| r.start * width..r.end * width;
            let (qr, kr, lr) = (rows(&qs, q_row), rows(&ks, kv_row), rows(&qs, c.heads.0));
            let single = alone.forward_backward(&q[qr.clone()], &k[kr.clone()], &v[kr.clone()], &g[qr.clone()]);
            for (name, i, r) in [("out", 0, &qr), ("lse", 1, &lr), ("dq", 2, &qr), ("dk", 3, &kr), ("dv", 4, &kr)] {
                assert_eq!(&packed[i][r.clone()], &single[i][..], "{name} of sequence {s}");
            }
        }
    }

    #[test]
    fn f32_agrees_with_f64() {
        let tol = Tolerance::F32;
        for (n, c) in [SMALL[5], SMALL[3], LARGE].iter().enumerate() {
            let [q, k, v, g] = c.inputs(20 + n as u64);
            let want = c.forward_backward(&q, &k, &v, &g);
            let got = c.forward_backward(&f32s(&q), &f32s(&k), &f32s(&v), &f32s(&g));
            for (name, (got, want)) in ["out", "lse", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                assert_close_lse(&format!("{name} {c:?}"), &f64s(got), want, tol);
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_bits() {
        let [q, k, v, g] = LARGE.inputs(5).map(|x| f32s(&x));
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| LARGE.forward_backward(&q, &k, &v, &g))
                .map(|x| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
        };
        assert_eq!(run(1), run(4));
    }
}
