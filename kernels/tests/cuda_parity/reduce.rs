use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, EXACT, LENS, REDUCED, ROWS};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::{assert_close, Tolerance};
use qlora_kernels::{cuda, reduce, Rng};

parity_test!(reductions_match_cpu: reduce_case, seed 10);

/// Sums (column sums of x and of x⊙y too): the GPU adds in f32 in a tree, the CPU in f64, so the bound scales with
/// Σ|x| (f32's 2⁻²⁴ per level of a ~20-level tree, with margin): |got − want| ≤ 1e-6·Σ|x| + 1e-5·|want|. max |x|
/// is exact. The twin runs on the widened inputs, and the GPU's f64 result is not rounded to T.
fn reduce_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for n in LENS.into_iter().chain([0, 1 << 20]) {
        let x = randn::<T>(rng, n, 1.0);
        let (xw, gx) = (widen(&x), upload(dev, &x));
        let abs_sum: f64 = xw.iter().map(|v| v.abs() as f64).sum();
        let sq_sum: f64 = xw.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let tol = |mag: f64| Tolerance { abs: 1e-6 * mag, rel: 1e-5 };
        let what = format!("n={n} [{}]", T::NAME);
        assert_close(
            &format!("sum {what}"),
            &[cuda::reduce::sum(&gx).unwrap()],
            &[reduce::sum(&xw) as f64],
            tol(abs_sum),
        );
        let got = cuda::reduce::sum_squares(&gx).unwrap();
        assert_close(&format!("sum_squares {what}"), &[got], &[reduce::sum_squares(&xw) as f64], tol(sq_sum));
        let got = cuda::reduce::max_abs(&gx).unwrap();
        assert_close(&format!("max_abs {what}"), &[got], &[reduce::max_abs(&xw) as f64], EXACT);
    }
    let mut x = randn::<T>(rng, 5000, 1.0);
    x[4321] = T::from_f32(f32::NAN);
    assert!(cuda::reduce::max_abs(&upload(dev, &x)).unwrap().is_nan(), "max_abs hides a NaN [{}]", T::NAME);

    for (rows, cols) in ROWS.into_iter().chain([(0, 5), (5000, 3), (70_001, 1), (129, 300)]) {
        let x = randn::<T>(rng, rows * cols, 1.0);
        let mut out = poisoned::<T>(dev, cols);
        cuda::reduce::sum_rows(&upload(dev, &x), cols, &mut out).unwrap();
        let mut want = vec![0.0f32; cols];
        reduce::sum_rows(&widen(&x), cols, &mut want);
        let tol = Tolerance { abs: 1e-6 * rows as f64, ..REDUCED };
        check(&format!("sum_rows {rows}x{cols}"), &out, &want, T::tol(tol));
        // Σ_rows x⊙y (DoRA's dm): the products in f32, unrounded, on both sides.
        let y = randn::<T>(rng, rows * cols, 1.0);
        let mut out = poisoned::<T>(dev, cols);
        cuda::reduce::sum_rows_product([&upload(dev, &x), &upload(dev, &y)], cols, &mut out).unwrap();
        reduce::sum_rows_product([&widen(&x), &widen(&y)], cols, &mut want);
        check(&format!("sum_rows_product {rows}x{cols}"), &out, &want, T::tol(tol));
    }
}
