use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, EXACT};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::rope::Direction;
use qlora_kernels::{cuda, rope, Rng};

parity_test!(rope_matches_cpu_bit_for_bit: rope_case, seed 4);

/// positions → (cos, sin): [tokens, head_dim/2] f32.
fn tables(rng: &mut Rng, tokens: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
    let inv_freq: Vec<f32> = rope::rope_inv_freq(head_dim, 10000.0);
    let positions: Vec<i32> = (0..tokens).map(|_| rng.below(4096) as i32).collect();
    let half = head_dim / 2;
    let (mut cos, mut sin) = (vec![0.0f32; tokens * half], vec![0.0f32; tokens * half]);
    rope::rope_tables(&positions, &inv_freq, &mut cos, &mut sin);
    (cos, sin)
}

/// (tokens, heads, head_dim). Vector path (half a multiple of 8): 16 (one chunk per head), 64, 80 (five chunks), 128,
/// 256. Scalar path: 2, 6, 24.
const SHAPES: [(usize, usize, usize); 8] =
    [(1, 1, 2), (3, 3, 6), (7, 4, 64), (33, 5, 128), (5, 2, 256), (2, 3, 16), (4, 2, 80), (3, 2, 24)];

fn rope_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (tokens, heads, head_dim) in SHAPES {
        let what = format!("tokens {tokens} heads {heads} head_dim {head_dim}");
        let (cos, sin) = tables(rng, tokens, head_dim);
        let x = randn::<T>(rng, tokens * heads * head_dim, 1.0);
        let (gx, gc, gs) = (upload(dev, &x), upload(dev, &cos), upload(dev, &sin));
        let mut want = vec![0.0f32; x.len()];

        let mut y = poisoned::<T>(dev, x.len());
        cuda::rope::rope(Direction::Forward, &gx, [&gc, &gs], heads, head_dim, &mut y).unwrap();
        rope::rope(Direction::Forward, &widen(&x), &cos, &sin, heads, head_dim, &mut want);
        check(&format!("rope_forward {what}"), &y, &want, EXACT);

        let mut dx = poisoned::<T>(dev, x.len());
        cuda::rope::rope(Direction::Backward, &gx, [&gc, &gs], heads, head_dim, &mut dx).unwrap();
        rope::rope(Direction::Backward, &widen(&x), &cos, &sin, heads, head_dim, &mut want);
        check(&format!("rope_backward {what}"), &dx, &want, EXACT);
    }
}

parity_test!(rope_qk_matches_cpu_bit_for_bit: rope_qk_case, seed 14);

/// q and k rotated together, grouped-query shapes included; and with v, k and v written into a KV cache's rows.
fn rope_qk_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    let shapes =
        [(1, 1, 1, 2), (3, 3, 1, 6), (7, 4, 2, 64), (33, 8, 1, 128), (5, 2, 2, 256), (4, 3, 1, 80), (3, 1, 2, 24)];
    for (tokens, q_heads, k_heads, head_dim) in shapes {
        let what = format!("tokens {tokens} heads {q_heads}/{k_heads} head_dim {head_dim}");
        let (cos, sin) = tables(rng, tokens, head_dim);
        let (gc, gs) = (upload(dev, &cos), upload(dev, &sin));
        let q = randn::<T>(rng, tokens * q_heads * head_dim, 1.0);
        let k = randn::<T>(rng, tokens * k_heads * head_dim, 1.0);
        let (gq, gk) = (upload(dev, &q), upload(dev, &k));
        for dir in [Direction::Forward, Direction::Backward] {
            let (mut yq, mut yk) = (poisoned::<T>(dev, q.len()), poisoned::<T>(dev, k.len()));
            cuda::rope::rope_qk(dir, [&gq, &gk], [&gc, &gs], [q_heads, k_heads], head_dim, [&mut yq, &mut yk]).unwrap();
            let (mut wq, mut wk) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()]);
            let heads = [q_heads, k_heads];
            rope::rope_qk(dir, [&widen(&q), &widen(&k)], [&cos, &sin], heads, head_dim, [&mut wq, &mut wk]);
            check(&format!("rope_qk q {dir:?} {what}"), &yq, &wq, EXACT);
            check(&format!("rope_qk k {dir:?} {what}"), &yk, &wk, EXACT);
            if dir == Direction::Forward {
                // k rotated and v copied into buffers of 2 more rows, from row 1; the rows around keep their values.
                let (v, row) = (randn::<T>(rng, k.len(), 1.0), k_heads * head_dim);
                let (k_old, v_old) = (randn::<T>(rng, k.len() + 2 * row, 1.0), randn::<T>(rng, k.len() + 2 * row, 1.0));
                let (mut yq, mut kd, mut vd) = (poisoned::<T>(dev, q.len()), upload(dev, &k_old), upload(dev, &v_old));
                let (inputs, dst) = ([&gq, &gk, &upload(dev, &v)], ([&mut kd, &mut vd], row));
                cuda::rope::rope_qkv(inputs, [&gc, &gs], [q_heads, k_heads], head_dim, &mut yq, dst).unwrap();
                let spliced = |old: &[T], new: &[f32]| {
                    let old = widen(old);
                    [&old[..row], new, &old[old.len() - row..]].concat()
                };
                check(&format!("rope_qkv q {what}"), &yq, &wq, EXACT);
                check(&format!("rope_qkv k {what}"), &kd, &spliced(&k_old, &wk), EXACT);
                check(&format!("rope_qkv v {what}"), &vd, &spliced(&v_old, &widen(&v)), EXACT);
            }
        }
    }
}
