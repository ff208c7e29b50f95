use crate::common::{check, narrow, parity_test, poisoned, randn, upload, widen, Elem, EXACT, ROWS};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::dora::Axis;
use qlora_kernels::{cuda, dora, Rng};

parity_test!(dora_matches_cpu: dora_case, seed 17);

fn dora_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (rows, cols) in ROWS.into_iter().chain([(5, 14336)]) {
        let t = randn::<T>(rng, rows * cols, 1.0);
        let (tw, gt) = (widen(&t), upload(dev, &t));
        let what = |op: &str| format!("{op} {rows}x{cols}");

        // Both sides sum squares in f64 in the same order and round once: the merge's promise of equal bytes.
        let mut want = vec![0.0f32; rows];
        dora::row_norms(&tw, cols, &mut want);
        let mut norms = poisoned::<T>(dev, rows);
        cuda::dora::row_norms(&gt, cols, &mut norms).unwrap();
        check(&what("row_norms"), &norms, &want, EXACT);

        // Magnitudes over norms, as g = m / n (denominators kept away from zero).
        let m = randn::<T>(rng, rows, 1.0);
        let n: Vec<T> = narrow(&widen(&randn::<T>(rng, rows, 1.0)).iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>());
        let mut want = vec![0.0f32; rows];
        dora::ratio(&widen(&m), &widen(&n), &mut want);
        let mut g = poisoned::<T>(dev, rows);
        cuda::dora::ratio(&upload(dev, &m), &upload(dev, &n), &mut g).unwrap();
        check(&what("ratio"), &g, &want, T::TOL);

        for (axis, len) in [(Axis::Rows, rows), (Axis::Cols, cols)] {
            let c = randn::<T>(rng, len, 1.0);
            for offset in [0.0f32, -1.0] {
                let mut want = vec![0.0f32; rows * cols];
                dora::scale_by(&tw, cols, &widen(&c), offset, axis, &mut want);
                let mut out = poisoned::<T>(dev, rows * cols);
                cuda::dora::scale_by(&gt, cols, &upload(dev, &c), offset, axis, &mut out).unwrap();
                check(&what(&format!("scale_by {axis:?} offset {offset}")), &out, &want, T::TOL);
            }
        }

        let (zd, sv, gc) =
            (randn::<T>(rng, rows * cols, 1.0), randn::<T>(rng, rows * cols, 0.1), randn::<T>(rng, cols, 1.0));
        let (mut want_y, mut want_h) = (vec![0.0f32; rows * cols], vec![0.0f32; rows * cols]);
        dora::combine(&tw, &widen(&zd), &widen(&sv), &widen(&gc), &mut want_y, Some(&mut want_h));
        let (gzd, gsv, ggc) = (upload(dev, &zd), upload(dev, &sv), upload(dev, &gc));
        for keep_h in [false, true] {
            let (mut y, mut h) = (poisoned::<T>(dev, rows * cols), poisoned::<T>(dev, rows * cols));
            cuda::dora::combine(&gt, &gzd, &gsv, &ggc, &mut y, keep_h.then_some(&mut h)).unwrap();
            check(&what("combine y"), &y, &want_y, T::TOL);
            if keep_h {
                check(&what("combine h"), &h, &want_h, T::TOL);
            }
        }
    }
}
