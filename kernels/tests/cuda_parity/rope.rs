use crate::common::{both_dtypes, check, poisoned, randn, upload, widen, Elem, EXACT};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::gpu;
use qlora_kernels::{cuda, rope, Rng};

#[test]
fn rope_matches_cpu_bit_for_bit() {
    let Some(dev) = gpu("rope_matches_cpu_bit_for_bit") else { return };
    both_dtypes!(rope_case, &dev, &mut Rng::new(4));
}

fn rope_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (tokens, heads, head_dim) in [(1, 1, 2), (3, 3, 6), (7, 4, 64), (33, 5, 128), (5, 2, 256)] {
        let what = format!("tokens {tokens} heads {heads} head_dim {head_dim}");
        let inv_freq: Vec<f32> = rope::rope_inv_freq(head_dim, 10000.0);
        let positions: Vec<i32> = (0..tokens).map(|_| rng.below(4096) as i32).collect();
        let half = head_dim / 2;
        let (mut cos, mut sin) = (vec![0.0f32; tokens * half], vec![0.0f32; tokens * half]);
        rope::rope_tables(&positions, &inv_freq, &mut cos, &mut sin);
        let x = randn::<T>(rng, tokens * heads * head_dim, 1.0);
        let (gx, gc, gs) = (upload(dev, &x), upload(dev, &cos), upload(dev, &sin));
        let mut want = vec![0.0f32; x.len()];

        let mut y = poisoned::<T>(dev, x.len());
        cuda::rope::rope_forward(&gx, &gc, &gs, heads, head_dim, &mut y).unwrap();
        rope::rope_forward(&widen(&x), &cos, &sin, heads, head_dim, &mut want);
        check(&format!("rope_forward {what}"), &y, &want, EXACT);

        let mut dx = poisoned::<T>(dev, x.len());
        cuda::rope::rope_backward(&gx, &gc, &gs, heads, head_dim, &mut dx).unwrap();
        rope::rope_backward(&widen(&x), &cos, &sin, heads, head_dim, &mut want);
        check(&format!("rope_backward {what}"), &dx, &want, EXACT);
    }
}
