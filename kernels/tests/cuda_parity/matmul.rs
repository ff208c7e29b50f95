use crate::common::{parity_test, randn, upload, widen, Elem, REDUCED};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::matmul::Gemm;
use qlora_kernels::testing::assert_close;
use qlora_kernels::{cuda, matmul, Rng};

parity_test!(matmul_matches_cpu: matmul_case, seed 9);

/// One GEMM on the GPU and the CPU twin (f32, on the widened inputs), C starting as `c0` (or NaN when beta == 0, which
/// must not read it). Tolerance: REDUCED for f32 (k-term sums in cuBLASLt's order), BF16 for bf16 (one rounding).
fn matmul_one<T: Elem>(dev: &CudaDevice, rng: &mut Rng, g: Gemm, what: &str) {
    let a = randn::<T>(rng, g.len_a(), 1.0);
    let b = randn::<T>(rng, g.len_b(), 1.0);
    let c_len = g.len_c();
    let c0: Vec<T> = if g.beta == 0.0 { vec![T::from_f32(f32::NAN); c_len] } else { randn::<T>(rng, c_len, 1.0) };
    let mut gc = upload(dev, &c0);
    cuda::matmul::matmul(&g, &upload(dev, &a), &upload(dev, &b), &mut gc).unwrap();
    let mut want = widen(&c0);
    matmul::matmul(&g, &widen(&a), &widen(&b), &mut want);
    // Offsets, gaps between batch entries and between rows of C are neither written nor read: they keep c0 (NaN where
    // beta == 0) on both sides, so only C's elements are compared.
    let got: Vec<f64> = gc.to_vec().unwrap().iter().map(|&v| v.to_f32() as f64).collect();
    let want: Vec<f64> = want.iter().map(|&v| T::from_f32(v).to_f32() as f64).collect();
    let ldc = g.lds().2;
    let stride_c = if g.batch == 1 { 0 } else { g.stride_c };
    let written: Vec<usize> = (0..g.batch)
        .flat_map(|e| (0..g.m).flat_map(move |i| (0..g.n).map(move |j| g.offset_c + e * stride_c + i * ldc + j)))
        .collect();
    let (got, want): (Vec<f64>, Vec<f64>) = written.iter().map(|&i| (got[i], want[i])).unzip();
    assert_close(&format!("matmul {what} [{}]", T::NAME), &got, &want, T::tol(REDUCED));
}

/// A few rows against a transposed B with a long k (decoding's LoRA x·Aᵀ), which `gemm_few_rows` computes when
/// aligned (one block per column of C): m = 1, 2, 3, 5, 8 (its 1-, 2-, 4- and 8-row kernels, rows past m unwritten),
/// k up to 14336; the odd offsets below and batched products take cuBLASLt.
const FEW_ROWS: [(usize, usize, usize); 4] = [(1, 48, 4096), (2, 16, 512), (8, 129, 1024), (5, 1, 14336)];

fn matmul_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    let shapes = [(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 129, 257), (100, 3, 1000), (2, 257, 31), (3, 17, 264)];
    for (m, n, k) in shapes.into_iter().chain(FEW_ROWS) {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb);
            matmul_one::<T>(dev, rng, g, &format!("{m}x{n}x{k} ta {ta} tb {tb}"));
            matmul_one::<T>(dev, rng, g.alpha(0.5).beta(0.75), &format!("{m}x{n}x{k} ta {ta} tb {tb} α .5 β .75"));
            let g = g.batched(3).alpha(-1.25).beta(1.0);
            matmul_one::<T>(dev, rng, g, &format!("3×{m}x{n}x{k} ta {ta} tb {tb} β 1"));
            // One weight for every batch entry (stride 0), and C entries with gaps between them.
            let bcast = Gemm { stride_b: 0, stride_c: m * n + 5, ..g.beta(0.0) };
            matmul_one::<T>(dev, rng, bcast, &format!("3×{m}x{n}x{k} ta {ta} tb {tb} B broadcast, C gaps"));
            let bcast = Gemm { stride_a: 0, ..g.beta(0.5) };
            matmul_one::<T>(dev, rng, bcast, &format!("3×{m}x{n}x{k} ta {ta} tb {tb} A broadcast"));
        }
    }
    // Column blocks of wider matrices (a LoRA group's slice of x·Aᵀ, its block of dU): leading dimensions past the
    // row length and offsets to the first column, odd ones included (they misalign every row).
    for (m, n, k) in [(3, 5, 7), (64, 16, 256), (129, 48, 16), (100, 3, 1000)].into_iter().chain(FEW_ROWS) {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for (pad, off) in [(16, 16), (5, 3)] {
                let base = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).alpha(0.5).beta(1.0);
                let ((_, ca), (_, cb)) = (base.stored_a(), base.stored_b());
                let g = Gemm {
                    ld_a: Some(ca + pad),
                    ld_b: Some(cb + pad),
                    ld_c: Some(n + pad),
                    offset_a: off,
                    offset_b: off,
                    offset_c: off,
                    ..base
                };
                let what = format!("{m}x{n}x{k} ta {ta} tb {tb} ld +{pad} offset {off}");
                matmul_one::<T>(dev, rng, g, &what);
                matmul_one::<T>(dev, rng, g.beta(0.0), &format!("{what} β 0"));
                let batched = Gemm { batch: 2, stride_a: g.len_a(), stride_b: g.len_b(), stride_c: g.len_c(), ..g };
                matmul_one::<T>(dev, rng, batched, &format!("2×{what}"));
            }
        }
    }
    for (k, alpha, beta) in [(0, 1.0, 0.0), (5, 0.0, 2.0)] {
        let g = Gemm { ld_c: Some(13), offset_c: 3, ..Gemm::new(7, 9, k).alpha(alpha).beta(beta).batched(2) };
        let g = Gemm { stride_c: g.len_c(), ..g };
        matmul_one::<T>(dev, rng, g, &format!("k {k} α {alpha} β {beta}, C block"));
    }
    // The products cuBLASLt does not take: C = beta·C, or zeros for beta == 0 over NaN.
    for (k, alpha, beta) in [(0, 1.0, 0.0), (0, 1.0, 0.5), (5, 0.0, 0.0), (5, 0.0, -2.0), (0, 1.0, 1.0)] {
        let g = Gemm::new(7, 9, k).alpha(alpha).beta(beta).batched(2);
        matmul_one::<T>(dev, rng, g, &format!("k {k} α {alpha} β {beta}"));
    }
    matmul_one::<T>(dev, rng, Gemm::new(4, 4, 4).batched(0), "batch 0");
    matmul_one::<T>(dev, rng, Gemm::new(0, 4, 4), "m 0");
}
