use crate::common::{check, parity_test, poisoned, randn, upload, widen, Elem, LENS, ROWS};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::{cuda, elementwise, Rng};

parity_test!(elementwise_matches_cpu: elementwise_case, seed 1);

fn elementwise_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    // The last length is more than one wave's grid-stride step of 8-element chunks.
    for n in LENS.into_iter().chain([5_000_003]) {
        let (a, b) = (randn::<T>(rng, n, 1.0), randn::<T>(rng, n, 1.0));
        let (aw, bw) = (widen(&a), widen(&b));
        let (ga, gb) = (upload(dev, &a), upload(dev, &b));
        let mut want = vec![0.0f32; n];
        let mut out = poisoned::<T>(dev, n);
        cuda::elementwise::add(&ga, &gb, &mut out).unwrap();
        elementwise::add(&aw, &bw, &mut want);
        check(&format!("add n={n}"), &out, &want, T::TOL);

        let mut out = poisoned::<T>(dev, n);
        cuda::elementwise::mul(&ga, &gb, &mut out).unwrap();
        elementwise::mul(&aw, &bw, &mut want);
        check(&format!("mul n={n}"), &out, &want, T::TOL);

        let mut out = poisoned::<T>(dev, n);
        cuda::elementwise::scale(&ga, -1.5, &mut out).unwrap();
        elementwise::scale(&aw, -1.5, &mut want);
        check(&format!("scale n={n}"), &out, &want, T::TOL);

        // The mask must match exactly: a zero against a kept value is far outside any tolerance.
        let mut out = poisoned::<T>(dev, n);
        let keep = (1.0 / 0.7) as f32;
        cuda::elementwise::dropout(&ga, 0.3, 99 + n as u64, keep, &mut out).unwrap();
        elementwise::dropout(&aw, 0.3, 99 + n as u64, keep, &mut want);
        check(&format!("dropout n={n}"), &out, &want, T::TOL);

        let mut y = upload(dev, &b);
        cuda::elementwise::axpy(0.25, &ga, &mut y).unwrap();
        let mut want = bw.clone();
        elementwise::axpy(0.25, &aw, &mut want);
        check(&format!("axpy n={n}"), &y, &want, T::TOL);
    }
    for (rows, cols) in ROWS {
        let (x, bias) = (randn::<T>(rng, rows * cols, 1.0), randn::<T>(rng, cols, 1.0));
        let mut gx = upload(dev, &x);
        cuda::elementwise::add_bias(&mut gx, &upload(dev, &bias)).unwrap();
        let mut want = widen(&x);
        elementwise::add_bias(&mut want, &widen(&bias));
        check(&format!("add_bias {rows}x{cols}"), &gx, &want, T::TOL);
    }
}
