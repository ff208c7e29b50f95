use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, EXACT};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::{cuda, lora, Rng};

parity_test!(lora_delta_matches_cpu_bit_for_bit: lora_case, seed 29);

/// The merge's promise: the GPU's delta is the CPU's to the bit (fixed order, no fused multiply-adds).
fn lora_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    // (rows, r, cols): one element, odd shapes, ranks 1 to 64, a row past one 256-column tile, and rows past the
    // 65535 of grid.y (the row stride).
    for (rows, r, cols) in [(1, 1, 1), (3, 2, 5), (7, 8, 257), (33, 16, 1000), (5, 64, 4099), (65_537, 1, 3)] {
        let (b, a) = (randn::<T>(rng, rows * r, 0.05), randn::<T>(rng, r * cols, 1.0));
        for s in [1.0f32, 2.0, 16.0 / 7f32.sqrt()] {
            let mut want = vec![0.0f32; rows * cols];
            lora::delta(&widen(&b), &widen(&a), r, s, &mut want);
            let mut got = poisoned::<T>(dev, rows * cols);
            cuda::lora::delta(&upload(dev, &b), &upload(dev, &a), r, s, &mut got).unwrap();
            check(&format!("lora delta {rows}x{r}x{cols} s {s}"), &got, &want, EXACT);
        }
    }
}
