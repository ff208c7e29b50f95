//! Rotary position embeddings in transformers' rotate-half layout (REFERENCE.md §5.2).
//!
//! Dimension `i` pairs with `i + head_dim/2` (not `2i` with `2i + 1`: HF checkpoints have q/k rows already permuted for
//! this). `y = x·cos + rotate_half(x)·sin` with `rotate_half(x) = [−x₂, x₁]`, evaluated in exactly that order so the
//! f32 result is transformers' to the bit given the same tables. Scaled variants (llama3, linear) only change
//! `inv_freq`, which the caller adjusts before building the tables.

use crate::Float;
use rayon::prelude::*;

/// Below this many elements a task costs more to schedule than to run.
const MIN_PAR_ELEMS: usize = 1 << 14;

/// inv_freq: [head_dim/2] = 1 / theta^(2i/head_dim), computed in f32 as transformers does (`base ** (arange(0,d,2).float()/d)`), returned as T.
pub fn rope_inv_freq<T: Float>(head_dim: usize, theta: f64) -> Vec<T> {
    check_head_dim(head_dim);
    let base = theta as f32;
    let d = head_dim as f32;
    (0..head_dim).step_by(2).map(|i| T::c((1.0 / base.powf(i as f32 / d)) as f64)).collect()
}

/// positions: \[tokens\], inv_freq: [half] → cos, sin: [tokens, half]  (angles = position·inv_freq, formed in T)
pub fn rope_tables<T: Float>(positions: &[i32], inv_freq: &[T], cos: &mut [T], sin: &mut [T]) {
    let half = inv_freq.len();
    assert!(half > 0, "rope_tables: inv_freq is empty");
    assert_eq!(cos.len(), positions.len() * half, "rope_tables: cos length");
    assert_eq!(sin.len(), positions.len() * half, "rope_tables: sin length");
    cos.par_chunks_mut(half)
        .zip(sin.par_chunks_mut(half))
        .zip(positions.par_iter())
        .with_min_len(MIN_PAR_ELEMS.div_ceil(half))
        .for_each(|((cos, sin), &p)| {
            let p = T::c(p as f64);
            for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(inv_freq) {
                (*s, *c) = (p * f).sin_cos();
            }
        });
}

/// Which way a rotation turns: by the tables' angles (the forward) or by their negatives (the backward: a rotation's
/// transpose is its inverse).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// x: [tokens, heads, head_dim], cos/sin: [tokens, head_dim/2] → y: [tokens, heads, head_dim] (dy → dx backward)
pub fn rope<T: Float>(dir: Direction, x: &[T], cos: &[T], sin: &[T], heads: usize, head_dim: usize, y: &mut [T]) {
    match dir {
        Direction::Forward => rotate::<T, false>(x, cos, sin, heads, head_dim, y),
        Direction::Backward => rotate::<T, true>(x, cos, sin, heads, head_dim, y),
    }
}

/// q: [tokens, q_heads, head_dim], k: [tokens, k_heads, head_dim], cos/sin: [tokens, head_dim/2] → yq, yk: q and k
/// rotated (the fused CUDA kernel rotates both in one launch; the results are [`rope`]'s)
pub fn rope_qk<T: Float>(
    dir: Direction,
    [q, k]: [&[T]; 2],
    [cos, sin]: [&[T]; 2],
    [q_heads, k_heads]: [usize; 2],
    head_dim: usize,
    [yq, yk]: [&mut [T]; 2],
) {
    rope(dir, q, cos, sin, q_heads, head_dim, yq);
    rope(dir, k, cos, sin, k_heads, head_dim, yk);
}

/// Rotates every head of every token by its angles, or by their negatives when `INVERSE` (a rotation's transpose is
/// its inverse, so that is the backward).
fn rotate<T: Float, const INVERSE: bool>(x: &[T], cos: &[T], sin: &[T], heads: usize, head_dim: usize, y: &mut [T]) {
    check_lengths(x.len(), cos.len(), sin.len(), y.len(), heads, head_dim);
    let (token_len, half) = (heads * head_dim, head_dim / 2);
    y.par_chunks_mut(token_len)
        .zip(x.par_chunks(token_len))
        .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
        .with_min_len(MIN_PAR_ELEMS.div_ceil(token_len))
        .for_each(|((y, x), (cos, sin))| {
            for (y, x) in y.chunks_mut(head_dim).zip(x.chunks(head_dim)) {
                let (y1, y2) = y.split_at_mut(half);
                let (x1, x2) = x.split_at(half);
                for i in 0..half {
                    let (c, s) = (cos[i], if INVERSE { -sin[i] } else { sin[i] });
                    y1[i] = x1[i] * c - x2[i] * s;
                    y2[i] = x2[i] * c + x1[i] * s;
                }
            }
        });
}

fn check_head_dim(head_dim: usize) {
    assert!(head_dim > 0 && head_dim % 2 == 0, "rope: head_dim {head_dim} must be even and positive");
}

/// The token count of a rotation's operands, checked against each other (the CUDA launchers share the contract).
pub(crate) fn check_lengths(x: usize, cos: usize, sin: usize, y: usize, heads: usize, head_dim: usize) -> usize {
    check_head_dim(head_dim);
    assert!(heads > 0, "rope: heads must be positive");
    let token_len = heads * head_dim;
    assert_eq!(x % token_len, 0, "rope: x length {x} is not a multiple of heads·head_dim {token_len}");
    let tokens = x / token_len;
    assert_eq!(cos, tokens * (head_dim / 2), "rope: cos length");
    assert_eq!(sin, tokens * (head_dim / 2), "rope: sin length");
    assert_eq!(y, x, "rope: output length");
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, check_gradient, dot, randn, Tolerance};
    use crate::Rng;

    const TOKENS: [usize; 3] = [1, 3, 7];
    const HEADS: [usize; 2] = [1, 3];
    const HEAD_DIMS: [usize; 3] = [2, 6, 64];

    /// Every (tokens, heads, head_dim) of the sweeps.
    fn shapes() -> impl Iterator<Item = (usize, usize, usize)> {
        TOKENS.into_iter().flat_map(|t| HEADS.into_iter().flat_map(move |h| HEAD_DIMS.map(move |d| (t, h, d))))
    }

    /// Outputs start as NaN so that an element the kernel forgot to write fails every comparison.
    fn tables<T: Float>(positions: &[i32], inv_freq: &[T]) -> (Vec<T>, Vec<T>) {
        let mut cos = vec![T::nan(); positions.len() * inv_freq.len()];
        let mut sin = vec![T::nan(); positions.len() * inv_freq.len()];
        rope_tables(positions, inv_freq, &mut cos, &mut sin);
        (cos, sin)
    }

    fn forward<T: Float>(x: &[T], cos: &[T], sin: &[T], heads: usize, head_dim: usize) -> Vec<T> {
        let mut y = vec![T::nan(); x.len()];
        rope(Direction::Forward, x, cos, sin, heads, head_dim, &mut y);
        y
    }

    fn backward<T: Float>(dy: &[T], cos: &[T], sin: &[T], heads: usize, head_dim: usize) -> Vec<T> {
        let mut dx = vec![T::nan(); dy.len()];
        rope(Direction::Backward, dy, cos, sin, heads, head_dim, &mut dx);
        dx
    }

    fn positions(rng: &mut Rng, tokens: usize) -> Vec<i32> {
        (0..tokens).map(|_| rng.below(4096) as i32).collect()
    }

    /// transformers' `apply_rotary_pos_emb` written out: `emb = cat(freqs, freqs)`, `q·cos(emb) + rotate_half(q)·sin(emb)`.
    fn transformers_reference(
        x: &[f64],
        positions: &[i32],
        inv_freq: &[f64],
        heads: usize,
        head_dim: usize,
    ) -> Vec<f64> {
        let mut y = Vec::with_capacity(x.len());
        for (t, &p) in positions.iter().enumerate() {
            let freqs: Vec<f64> = inv_freq.iter().map(|f| p as f64 * f).collect();
            let emb: Vec<f64> = freqs.iter().chain(&freqs).copied().collect();
            let cos: Vec<f64> = emb.iter().map(|a| a.cos()).collect();
            let sin: Vec<f64> = emb.iter().map(|a| a.sin()).collect();
            for h in 0..heads {
                let q = &x[(t * heads + h) * head_dim..][..head_dim];
                let (q1, q2) = q.split_at(head_dim / 2);
                let rotated: Vec<f64> = q2.iter().map(|v| -v).chain(q1.iter().copied()).collect();
                y.extend((0..head_dim).map(|j| q[j] * cos[j] + rotated[j] * sin[j]));
            }
        }
        y
    }

    #[test]
    fn inv_freq_is_formed_in_f32() {
        // 10000^(−2i/8) = 1, 0.1, 0.01, 0.001; the f64 result is the f32 value widened, not the f64 constant.
        let f: Vec<f64> = rope_inv_freq(8, 10000.0);
        assert_eq!(f, [1.0, 0.1f32 as f64, 0.01f32 as f64, 0.001f32 as f64]);
        assert_ne!(f[1], 0.1);
        assert_eq!(rope_inv_freq::<f32>(8, 10000.0), [1.0, 0.1, 0.01, 0.001]);
    }

    #[test]
    fn inv_freq_llama3_base_matches_the_formula() {
        let f: Vec<f64> = rope_inv_freq(128, 500000.0);
        let want: Vec<f64> = (0..64).map(|i| 500000f64.powf(-(2.0 * i as f64) / 128.0)).collect();
        // One f32 rounding of the exponent, the power and the reciprocal.
        assert_close("inv_freq", &f, &want, Tolerance { abs: 0.0, rel: 1e-6 });
    }

    #[test]
    fn tables_are_cos_and_sin_of_position_times_frequency() {
        let inv_freq: Vec<f64> = rope_inv_freq(6, 10000.0);
        let pos = [0, 1, 5, 17, 4095];
        let (cos, sin) = tables(&pos, &inv_freq);
        let angles: Vec<f64> = pos.iter().flat_map(|&p| inv_freq.iter().map(move |f| p as f64 * f)).collect();
        let exact = Tolerance { abs: 0.0, rel: 0.0 };
        assert_close("cos", &cos, &angles.iter().map(|a| a.cos()).collect::<Vec<_>>(), exact);
        assert_close("sin", &sin, &angles.iter().map(|a| a.sin()).collect::<Vec<_>>(), exact);
        assert_eq!(&cos[..3], [1.0; 3]);
        assert_eq!(&sin[..3], [0.0; 3]);
    }

    /// forward on random inputs against transformers' rotate_half: the same operations in the same order, so equal
    /// to the bit.
    fn assert_matches_transformers(rng: &mut Rng, tokens: usize, heads: usize, head_dim: usize) {
        let inv_freq: Vec<f64> = rope_inv_freq(head_dim, 10000.0);
        let pos = positions(rng, tokens);
        let x = randn(rng, tokens * heads * head_dim);
        let (cos, sin) = tables(&pos, &inv_freq);
        assert_eq!(
            forward(&x, &cos, &sin, heads, head_dim),
            transformers_reference(&x, &pos, &inv_freq, heads, head_dim),
            "tokens {tokens} heads {heads} head_dim {head_dim}"
        );
    }

    #[test]
    fn forward_matches_transformers_rotate_half() {
        let mut rng = Rng::new(1);
        for (tokens, heads, head_dim) in shapes() {
            assert_matches_transformers(&mut rng, tokens, heads, head_dim);
        }
    }

    #[test]
    fn position_zero_is_identity() {
        let mut rng = Rng::new(2);
        let (tokens, heads, head_dim) = (3, 3, 64);
        let (cos, sin) = tables(&vec![0; tokens], &rope_inv_freq::<f64>(head_dim, 10000.0));
        let x = randn(&mut rng, tokens * heads * head_dim);
        assert_eq!(forward(&x, &cos, &sin, heads, head_dim), x);
    }

    #[test]
    fn backward_matches_finite_differences_and_inverts_forward() {
        let mut rng = Rng::new(3);
        for (tokens, heads, head_dim) in shapes() {
            let (cos, sin) = tables(&positions(&mut rng, tokens), &rope_inv_freq::<f64>(head_dim, 10000.0));
            let x = randn(&mut rng, tokens * heads * head_dim);
            let g = randn(&mut rng, x.len());
            let what = format!("tokens {tokens} heads {heads} head_dim {head_dim}");
            let dx = backward(&g, &cos, &sin, heads, head_dim);
            check_gradient(&what, &x, &dx, |x| dot(&forward(x, &cos, &sin, heads, head_dim), &g));
            let round_trip = backward(&forward(&x, &cos, &sin, heads, head_dim), &cos, &sin, heads, head_dim);
            assert_close(&what, &round_trip, &x, Tolerance { abs: 1e-14, rel: 1e-14 });
        }
    }

    #[test]
    fn q_and_k_together_are_the_single_rotations_bit_for_bit() {
        let mut rng = Rng::new(6);
        let (tokens, q_heads, k_heads, head_dim) = (300, 4, 2, 64);
        let pos: Vec<i32> = (0..tokens).map(|_| rng.below(4096) as i32).collect();
        let (cos, sin) = tables(&pos, &rope_inv_freq::<f32>(head_dim, 10000.0));
        let q: Vec<f32> = randn(&mut rng, tokens * q_heads * head_dim).iter().map(|&v| v as f32).collect();
        let k: Vec<f32> = randn(&mut rng, tokens * k_heads * head_dim).iter().map(|&v| v as f32).collect();
        for (dir, want_q, want_k) in [
            (
                Direction::Forward,
                forward(&q, &cos, &sin, q_heads, head_dim),
                forward(&k, &cos, &sin, k_heads, head_dim),
            ),
            (
                Direction::Backward,
                backward(&q, &cos, &sin, q_heads, head_dim),
                backward(&k, &cos, &sin, k_heads, head_dim),
            ),
        ] {
            let (mut yq, mut yk) = (vec![0.0; q.len()], vec![0.0; k.len()]);
            rope_qk(dir, [&q, &k], [&cos, &sin], [q_heads, k_heads], head_dim, [&mut yq, &mut yk]);
            assert_eq!((yq, yk), (want_q, want_k), "{dir:?}");
        }
    }

    #[test]
    fn f32_agrees_with_f64() {
        let mut rng = Rng::new(4);
        let (tokens, heads, head_dim) = (7, 3, 64);
        // Small positions: an f32 angle p·f carries p·f·2⁻²⁴ of error, which at long range exceeds f32 tolerance
        // in both transformers and here.
        let pos: Vec<i32> = (0..tokens as i32).collect();
        let x: Vec<f32> = randn(&mut rng, tokens * heads * head_dim).iter().map(|&v| v as f32).collect();
        let (c32, s32) = tables(&pos, &rope_inv_freq::<f32>(head_dim, 10000.0));
        let (c64, s64) = tables(&pos, &rope_inv_freq::<f64>(head_dim, 10000.0));
        let widen = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<_>>();
        assert_close("cos", &widen(&c32), &c64, Tolerance::F32);
        assert_close("sin", &widen(&s32), &s64, Tolerance::F32);
        let y32 = forward(&x, &c32, &s32, heads, head_dim);
        assert_close("y", &widen(&y32), &forward(&widen(&x), &c64, &s64, heads, head_dim), Tolerance::F32);
        let dx32 = backward(&x, &c32, &s32, heads, head_dim);
        assert_close("dx", &widen(&dx32), &backward(&widen(&x), &c64, &s64, heads, head_dim), Tolerance::F32);
    }

    #[test]
    fn many_tokens_split_across_tasks_match_reference() {
        assert_matches_transformers(&mut Rng::new(5), 300, 4, 64);
    }

    #[test]
    #[should_panic(expected = "must be even")]
    fn odd_head_dim_panics() {
        rope_inv_freq::<f32>(5, 10000.0);
    }

    #[test]
    #[should_panic(expected = "cos length")]
    fn table_length_mismatch_panics() {
        forward(&[0.0; 8], &[1.0; 3], &[0.0; 4], 1, 4);
    }
}
