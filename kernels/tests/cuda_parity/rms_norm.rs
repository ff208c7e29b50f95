use crate::common::{both_dtypes, check, poisoned, randn, upload, widen, Elem, REDUCED, ROWS};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::testing::gpu;
use qlora_kernels::{cuda, rms_norm, Rng};

#[test]
fn rms_norm_matches_cpu() {
    let Some(dev) = gpu("rms_norm_matches_cpu") else { return };
    both_dtypes!(rms_norm_case, &dev, &mut Rng::new(3));
}

fn rms_norm_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    const EPS: f32 = 1e-6;
    // 300 rows: several rows per dw block; 600: more rows than dw blocks.
    for (rows, dim) in ROWS.into_iter().chain([(300, 64), (600, 33)]) {
        for offset in [0.0f32, 1.0] {
            let what = format!("{rows}x{dim} offset {offset}");
            let (x, w, dy) =
                (randn::<T>(rng, rows * dim, 1.0), randn::<T>(rng, dim, 1.0), randn::<T>(rng, rows * dim, 1.0));
            let (xw, ww, dyw) = (widen(&x), widen(&w), widen(&dy));
            let (gx, gw, gdy) = (upload(dev, &x), upload(dev, &w), upload(dev, &dy));
            let (mut y, mut rstd) = (poisoned::<T>(dev, rows * dim), poisoned::<f32>(dev, rows));
            cuda::rms_norm::rms_norm_forward(&gx, &gw, dim, EPS, offset, &mut y, &mut rstd).unwrap();
            let (mut want_y, mut want_rstd) = (vec![0.0f32; rows * dim], vec![0.0f32; rows]);
            rms_norm::rms_norm_forward(&xw, &ww, dim, EPS, offset, &mut want_y, &mut want_rstd);
            check(&format!("rms_norm y {what}"), &y, &want_y, T::tol(REDUCED));
            check(&format!("rms_norm rstd {what}"), &rstd, &want_rstd, REDUCED);

            // Backward from the CPU's rstd, so that it is checked on its own.
            let (mut dx, mut dw) = (poisoned::<T>(dev, rows * dim), poisoned::<T>(dev, dim));
            let cpu_rstd = upload(dev, &want_rstd);
            cuda::rms_norm::rms_norm_backward(&gx, &gw, &cpu_rstd, &gdy, dim, offset, &mut dx, &mut dw).unwrap();
            let (mut want_dx, mut want_dw) = (vec![0.0f32; rows * dim], vec![0.0f32; dim]);
            rms_norm::rms_norm_backward(&xw, &ww, &want_rstd, &dyw, dim, offset, &mut want_dx, &mut want_dw);
            check(&format!("rms_norm dx {what}"), &dx, &want_dx, T::tol(REDUCED));
            check(&format!("rms_norm dw {what}"), &dw, &want_dw, T::tol(REDUCED));
        }
    }
}
