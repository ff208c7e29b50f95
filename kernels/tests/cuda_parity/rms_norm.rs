use crate::common::{check, narrow, parity_test, poisoned, randn, upload, widen, Elem, EXACT, REDUCED, ROWS};
use qlora_kernels::cuda::CudaDevice;
use qlora_kernels::{cuda, rms_norm, Rng};

const EPS: f32 = 1e-6;

/// (rows, dim) beyond `ROWS` for the paths of cuda/rms_norm.rs. Vector path (dim a multiple of 8): 64 (a block of
/// one warp, most threads past the row), 1000 (the last warp partly past it), 2048 and 4096 (256 and 512 threads),
/// 8192 (1024 threads: bf16's wide backward; f32's backward goes scalar); 4000 × 1024: blocks of several steps of
/// rows, odd row counts: a last step of one row where bf16 takes two. Scalar path: dims not a multiple of 8
/// (ROWS), and 8200 (more chunks than a block has threads). 300 × 64 and 600 × 33: more rows than blocks.
const MORE_ROWS: [(usize, usize); 9] =
    [(300, 64), (600, 33), (4000, 1024), (5, 2048), (3, 4096), (33, 8192), (7, 8200), (2, 16), (1, 8)];

parity_test!(rms_norm_matches_cpu: rms_norm_case, seed 3);

fn rms_norm_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (rows, dim) in ROWS.into_iter().chain(MORE_ROWS) {
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
            cuda::rms_norm::rms_norm_backward(&gx, &gw, &cpu_rstd, &gdy, dim, offset, &mut dx, Some(&mut dw)).unwrap();
            let (mut want_dx, mut want_dw) = (vec![0.0f32; rows * dim], vec![0.0f32; dim]);
            rms_norm::rms_norm_backward(&xw, &ww, &want_rstd, &dyw, dim, offset, &mut want_dx, Some(&mut want_dw));
            check(&format!("rms_norm dx {what}"), &dx, &want_dx, T::tol(REDUCED));
            check(&format!("rms_norm dw {what}"), &dw, &want_dw, T::tol(REDUCED));

            // Without dw (a frozen weight): a grid of all resident blocks, no partial sums.
            let mut dx = poisoned::<T>(dev, rows * dim);
            cuda::rms_norm::rms_norm_backward(&gx, &gw, &cpu_rstd, &gdy, dim, offset, &mut dx, None).unwrap();
            check(&format!("rms_norm dx without dw {what}"), &dx, &want_dx, T::tol(REDUCED));
        }
    }
}

parity_test!(add_rms_norm_matches_cpu: add_rms_norm_case, seed 13);

/// The fused residual add + norm against its CPU twin: h exact (one rounded add), the norm of h as stored.
fn add_rms_norm_case<T: Elem>(dev: &CudaDevice, rng: &mut Rng) {
    for (rows, dim) in ROWS.into_iter().chain(MORE_ROWS) {
        for offset in [0.0f32, 1.0] {
            let what = format!("{rows}x{dim} offset {offset}");
            let n = rows * dim;
            let (x, r, w) = (randn::<T>(rng, n, 1.0), randn::<T>(rng, n, 1.0), randn::<T>(rng, dim, 1.0));
            let (dy, dr) = (randn::<T>(rng, n, 1.0), randn::<T>(rng, n, 1.0));
            let (gx, gr, gw) = (upload(dev, &x), upload(dev, &r), upload(dev, &w));
            let (mut h, mut y, mut rstd) = (poisoned::<T>(dev, n), poisoned::<T>(dev, n), poisoned::<f32>(dev, rows));
            cuda::rms_norm::add_rms_norm_forward(&gx, &gr, &gw, dim, EPS, offset, &mut h, &mut y, &mut rstd).unwrap();
            // The CPU twin in f32 on the widened inputs, with h rounded to T as the GPU stores (and normalizes) it.
            let (mut want_h, mut want_y, mut want_rstd) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; rows]);
            let (xw, rw, ww) = (widen(&x), widen(&r), widen(&w));
            rms_norm::add_rms_norm_forward(&xw, &rw, &ww, dim, EPS, offset, &mut want_h, &mut want_y, &mut want_rstd);
            let hw = widen(&narrow::<T>(&want_h));
            rms_norm::rms_norm_forward(&hw, &ww, dim, EPS, offset, &mut want_y, &mut want_rstd);
            check(&format!("add_rms_norm h {what}"), &h, &want_h, EXACT);
            check(&format!("add_rms_norm y {what}"), &y, &want_y, T::tol(REDUCED));
            check(&format!("add_rms_norm rstd {what}"), &rstd, &want_rstd, REDUCED);

            let (mut dx, mut dw) = (poisoned::<T>(dev, n), poisoned::<T>(dev, dim));
            let (gh, gdy, gdr, cpu_rstd) =
                (upload(dev, &narrow::<T>(&hw)), upload(dev, &dy), upload(dev, &dr), upload(dev, &want_rstd));
            cuda::rms_norm::add_rms_norm_backward(&gh, &gw, &cpu_rstd, &gdy, &gdr, dim, offset, &mut dx, Some(&mut dw))
                .unwrap();
            let (mut want_dx, mut want_dw) = (vec![0.0f32; n], vec![0.0f32; dim]);
            rms_norm::add_rms_norm_backward(
                &hw,
                &ww,
                &want_rstd,
                &widen(&dy),
                &widen(&dr),
                dim,
                offset,
                &mut want_dx,
                Some(&mut want_dw),
            );
            check(&format!("add_rms_norm dx {what}"), &dx, &want_dx, T::tol(REDUCED));
            check(&format!("add_rms_norm dw {what}"), &dw, &want_dw, T::tol(REDUCED));
            let mut dx = poisoned::<T>(dev, n);
            cuda::rms_norm::add_rms_norm_backward(&gh, &gw, &cpu_rstd, &gdy, &gdr, dim, offset, &mut dx, None).unwrap();
            check(&format!("add_rms_norm dx without dw {what}"), &dx, &want_dx, T::tol(REDUCED));
        }
    }
}
