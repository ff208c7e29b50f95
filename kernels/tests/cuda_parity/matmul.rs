use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, REDUCED};
use qlora_kernels::activation::{self, Glu};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::matmul::Gemm;
use qlora_kernels::rms_norm;
use qlora_kernels::testing::assert_close;
use qlora_kernels::{cuda, matmul, Rng};

parity_test!(matmul_matches_cpu: matmul_case, seed 9);
parity_test!(glu_few_rows_matches_cpu: glu_few_rows_case, seed 31);
parity_test!(norm_few_rows_matches_cpu: norm_few_rows_case, seed 37);

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

/// Decoding's GLU and down_proj adapter's U = x·Aᵀ in one launch (`glu_few_rows`): x has the bits of the GLU kernel's
/// output and the product those of `gemm_few_rows` on that x (what the two launches it replaces give), and both match
/// the CPU twins (the GLU, then the product in f32 on its rounded output). Rows 1, 2, 3, 5, 8 (rows past m neither
/// written nor read into a sum), one column to 129 (the grid; x's chunks are written by the block of their index
/// modulo it), k from 256 to 8192 (the longest it takes). Shapes outside `gemm_few_rows`', and longer rows, return false
/// and leave both outputs as they were.
fn glu_few_rows_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    let bits =
        |b: &cuda::DeviceBuffer<T>| -> Vec<u32> { b.to_vec().unwrap().iter().map(|v| v.to_f32().to_bits()).collect() };
    for kind in [Glu::SwiGlu, Glu::GeGlu] {
        for (m, n, k) in [(1, 16, 8192), (2, 48, 4096), (3, 1, 256), (5, 129, 1032), (8, 17, 2048)] {
            let what = format!("{kind:?} {m}x{n}x{k}");
            let (gate, up, b) = (randn::<T>(rng, m * k, 2.0), randn::<T>(rng, m * k, 1.0), randn::<T>(rng, n * k, 1.0));
            let (gg, gu, gb) = (upload(dev, &gate), upload(dev, &up), upload(dev, &b));
            let (mut x, mut c) = (poisoned::<T>(dev, m * k), poisoned::<T>(dev, m * n));
            let taken = cuda::matmul::glu_few_rows(kind, &gg, &gu, &gb, &mut x, &mut c, (m, n, k)).unwrap();
            assert!(taken, "{what}: not taken");
            // The two launches it stands for.
            let mut x2 = poisoned::<T>(dev, m * k);
            cuda::activation::glu_forward(kind, &gg, &gu, &mut x2).unwrap();
            let mut c2 = poisoned::<T>(dev, m * n);
            cuda::matmul::matmul(&Gemm::new(m, n, k).trans_b(true), &x2, &gb, &mut c2).unwrap();
            assert_eq!(bits(&x), bits(&x2), "{what}: x against the GLU kernel's");
            assert_eq!(bits(&c), bits(&c2), "{what}: x·bᵀ against gemm_few_rows'");
            let mut want_x = vec![0.0f32; m * k];
            activation::glu_forward(kind, &widen(&gate), &widen(&up), &mut want_x);
            check(&format!("glu_few_rows {what}: x"), &x, &want_x, T::TOL);
            let rounded_x = widen(&x.to_vec().unwrap());
            let mut want_c = vec![0.0f32; m * n];
            matmul::matmul(&Gemm::new(m, n, k).trans_b(true), &rounded_x, &widen(&b), &mut want_c);
            check(&format!("glu_few_rows {what}: x·bᵀ"), &c, &want_c, T::tol(REDUCED));
        }
    }
    // Not taken: too many rows, too short a k, a k off the vector path, no columns, rows past 8192.
    for (m, n, k) in [(9, 16, 512), (1, 16, 128), (2, 16, 1028), (1, 0, 512), (1, 16, 14336)] {
        let (gg, gu, gb) = (
            upload(dev, &randn::<T>(rng, m * k, 1.0)),
            upload(dev, &randn::<T>(rng, m * k, 1.0)),
            upload(dev, &randn::<T>(rng, (n * k).max(1), 1.0)),
        );
        let (x0, c0) = (randn::<T>(rng, m * k, 1.0), randn::<T>(rng, (m * n).max(1), 1.0));
        let (mut x, mut c) = (upload(dev, &x0), upload(dev, &c0));
        let taken = cuda::matmul::glu_few_rows(Glu::SwiGlu, &gg, &gu, &gb, &mut x, &mut c, (m, n, k)).unwrap();
        assert!(!taken, "{m}x{n}x{k}: taken");
        assert_eq!(bits(&x), x0.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>(), "{m}x{n}x{k}: x written");
        assert_eq!(bits(&c), c0.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>(), "{m}x{n}x{k}: c written");
    }
}

/// Decoding's norm before q/k/v or gate/up and the adapters' U = y·Aᵀ in one launch (`norm_few_rows`): h and y have
/// the bits of the norm kernel's outputs and the product those of `gemm_few_rows` on that y (the two launches it
/// replaces), and all match the CPU twins. With and without the residual add, both offsets (Llama's w, Gemma's
/// 1 + w); rows 1, 2, 3, 5, 8; one column to 48; row lengths from 264 to 4096 (the largest it takes: one chunk a
/// thread, as in the norm kernel), Gemma-3-270M's 640 and SmolLM2's 576 among them. Rows past 4096, too many rows, or
/// a length off the vector path return false and leave the outputs as they were.
fn norm_few_rows_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    let bits =
        |b: &cuda::DeviceBuffer<T>| -> Vec<u32> { b.to_vec().unwrap().iter().map(|v| v.to_f32().to_bits()).collect() };
    let eps = 1e-6f32;
    for add in [false, true] {
        for offset in [0.0f32, 1.0] {
            for (m, n, k) in [(1, 48, 4096), (2, 32, 2048), (3, 1, 576), (5, 17, 264), (8, 16, 4096), (1, 16, 640)] {
                let what = format!("add {add} offset {offset} {m}x{n}x{k}");
                let (x, res) = (randn::<T>(rng, m * k, 1.0), randn::<T>(rng, m * k, 1.0));
                let (w, b) = (randn::<T>(rng, k, 0.5), randn::<T>(rng, n * k, 1.0));
                let (gx, gr, gw, gb) = (upload(dev, &x), upload(dev, &res), upload(dev, &w), upload(dev, &b));
                let (mut h, mut y, mut c) =
                    (poisoned::<T>(dev, m * k), poisoned::<T>(dev, m * k), poisoned::<T>(dev, m * n));
                let pair = add.then_some((&gr, &mut h));
                let taken = cuda::matmul::norm_few_rows(&gx, pair, &gw, (eps, offset), &gb, &mut y, &mut c, (m, n, k));
                assert!(taken.unwrap(), "{what}: not taken");
                // The two launches it stands for.
                let (mut h2, mut y2, mut rstd) =
                    (poisoned::<T>(dev, m * k), poisoned::<T>(dev, m * k), poisoned::<f32>(dev, m));
                let pair = add.then_some((&gr, &mut h2));
                cuda::rms_norm::rms_norm_forward(&gx, pair, &gw, k, eps, offset, &mut y2, &mut rstd).unwrap();
                let mut c2 = poisoned::<T>(dev, m * n);
                cuda::matmul::matmul(&Gemm::new(m, n, k).trans_b(true), &y2, &gb, &mut c2).unwrap();
                assert_eq!(bits(&y), bits(&y2), "{what}: y against the norm kernel's");
                if add {
                    assert_eq!(bits(&h), bits(&h2), "{what}: h against the norm kernel's");
                }
                assert_eq!(bits(&c), bits(&c2), "{what}: y·bᵀ against gemm_few_rows'");
                let (mut want_h, mut want_y, mut want_rstd) =
                    (vec![0.0f32; m * k], vec![0.0f32; m * k], vec![0.0f32; m]);
                let (xw, rw, ww) = (widen(&x), widen(&res), widen(&w));
                if add {
                    rms_norm::add_rms_norm_forward(
                        &xw,
                        &rw,
                        &ww,
                        k,
                        eps,
                        offset,
                        &mut want_h,
                        &mut want_y,
                        &mut want_rstd,
                    );
                    check(&format!("norm_few_rows {what}: h"), &h, &want_h, T::TOL);
                } else {
                    rms_norm::rms_norm_forward(&xw, &ww, k, eps, offset, &mut want_y, &mut want_rstd);
                }
                check(&format!("norm_few_rows {what}: y"), &y, &want_y, T::TOL);
                let rounded_y = widen(&y.to_vec().unwrap());
                let mut want_c = vec![0.0f32; m * n];
                matmul::matmul(&Gemm::new(m, n, k).trans_b(true), &rounded_y, &widen(&b), &mut want_c);
                check(&format!("norm_few_rows {what}: y·bᵀ"), &c, &want_c, T::tol(REDUCED));
            }
        }
    }
    for (m, n, k) in [(1, 16, 4104), (9, 16, 512), (2, 16, 1028), (1, 16, 128)] {
        let (gx, gw, gb) = (
            upload(dev, &randn::<T>(rng, m * k, 1.0)),
            upload(dev, &randn::<T>(rng, k, 1.0)),
            upload(dev, &randn::<T>(rng, n * k, 1.0)),
        );
        let (y0, c0) = (randn::<T>(rng, m * k, 1.0), randn::<T>(rng, m * n, 1.0));
        let (mut y, mut c) = (upload(dev, &y0), upload(dev, &c0));
        let taken = cuda::matmul::norm_few_rows(&gx, None, &gw, (eps, 0.0), &gb, &mut y, &mut c, (m, n, k)).unwrap();
        assert!(!taken, "{m}x{n}x{k}: taken");
        assert_eq!(bits(&y), y0.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>(), "{m}x{n}x{k}: y written");
        assert_eq!(bits(&c), c0.iter().map(|v| v.to_f32().to_bits()).collect::<Vec<_>>(), "{m}x{n}x{k}: c written");
    }
}
