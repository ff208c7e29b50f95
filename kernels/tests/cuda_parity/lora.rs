use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, EXACT};
use half::bf16;
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::Tolerance;
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

/// LoRA's adapter gradients from one read of dy (`cuda::lora::grads`): dU = s·dy·B and dB = s·dyᵀ·U against the two
/// products summed in f64 on the CPU and rounded once to bf16 (the GPU sums in f32 in its own order: BF16's tolerance).
/// U and dU are column blocks of wider matrices (an offset and a row stride); rows and columns miss the kernel's
/// 64 × 128 tiles, many row and column chunks, every rank it has, no rows at all. dU's other columns keep their values,
/// and a second call gives the same bits.
#[test]
fn lora_grads_match_cpu() {
    let Some(dev) = qlora_kernels::testing::gpu("lora_grads_match_cpu") else { return };
    let rng = &mut Rng::new(31);
    // (rows, cols, r, first column of U and dU in their matrices, their width)
    for (rows, cols, r, lead, width) in [
        (1, 8, 16, 0, 16),
        (37, 264, 16, 16, 48),
        (300, 1032, 32, 32, 96),
        (130, 520, 64, 0, 72),
        (2000, 4096, 16, 0, 16),
        (4099, 1544, 16, 32, 48),
        (0, 64, 16, 0, 16),
    ] {
        let what = format!("lora grads [{rows}, {cols}] r {r} columns {lead}.. of {width}");
        let (dy, b) = (randn::<bf16>(rng, rows * cols, 1.0), randn::<bf16>(rng, cols * r, 0.1));
        let (u, du0) = (randn::<bf16>(rng, rows * width, 1.0), randn::<bf16>(rng, rows * width, 1.0));
        let s = 0.75;
        let (dyw, bw, uw) = (widen(&dy), widen(&b), widen(&u));
        let mut want_du = widen(&du0);
        for m in 0..rows {
            for c in 0..r {
                let sum: f64 = (0..cols).map(|n| dyw[m * cols + n] as f64 * bw[n * r + c] as f64).sum();
                want_du[m * width + lead + c] = (s * sum) as f32;
            }
        }
        let mut want_db = vec![0.0f32; cols * r];
        for n in 0..cols {
            for c in 0..r {
                let sum: f64 = (0..rows).map(|m| dyw[m * cols + n] as f64 * uw[m * width + lead + c] as f64).sum();
                want_db[n * r + c] = (s * sum) as f32;
            }
        }
        let (dy_d, b_d, u_d) = (upload(&dev, &dy), upload(&dev, &b), upload(&dev, &u));
        let run = || {
            let (mut du, mut db) = (upload(&dev, &du0), poisoned::<bf16>(&dev, cols * r));
            let u_rows = cuda::lora::Rows { buf: &u_d, offset: lead, ld: width };
            let du_rows = cuda::lora::Rows { buf: &mut du, offset: lead, ld: width };
            cuda::lora::grads(&dy_d, &b_d, u_rows, s as f32, du_rows, &mut db, [rows, cols, r]).unwrap();
            (du, db)
        };
        let (du, db) = run();
        check(&format!("{what}: dU"), &du, &want_du, Tolerance::BF16);
        check(&format!("{what}: dB"), &db, &want_db, Tolerance::BF16);
        let (du2, db2) = run();
        let bits = |b: &qlora_kernels::cuda::DeviceBuffer<bf16>| {
            b.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        assert!(bits(&du) == bits(&du2) && bits(&db) == bits(&db2), "{what}: another call, other bits");
    }
}
