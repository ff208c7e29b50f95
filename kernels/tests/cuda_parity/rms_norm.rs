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
            let (xw, ww) = (widen(&x), widen(&w));
            let (gx, gw) = (upload(dev, &x), upload(dev, &w));
            let (mut y, mut rstd) = (poisoned::<T>(dev, rows * dim), poisoned::<f32>(dev, rows));
            cuda::rms_norm::rms_norm_forward(&gx, None, &gw, dim, EPS, offset, &mut y, &mut rstd).unwrap();
            let (mut want_y, mut want_rstd) = (vec![0.0f32; rows * dim], vec![0.0f32; rows]);
            rms_norm::rms_norm_forward(&xw, &ww, dim, EPS, offset, &mut want_y, &mut want_rstd);
            check(&format!("rms_norm y {what}"), &y, &want_y, T::tol(REDUCED));
            check(&format!("rms_norm rstd {what}"), &rstd, &want_rstd, REDUCED);

            check_backward(dev, &what, [&x, &w, &dy], None, &want_rstd, dim, offset);
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
            cuda::rms_norm::rms_norm_forward(&gx, Some((&gr, &mut h)), &gw, dim, EPS, offset, &mut y, &mut rstd)
                .unwrap();
            // The CPU twin in f32 on the widened inputs, with h rounded to T as the GPU stores (and normalizes) it.
            let (mut want_h, mut want_y, mut want_rstd) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; rows]);
            let (xw, rw, ww) = (widen(&x), widen(&r), widen(&w));
            rms_norm::add_rms_norm_forward(&xw, &rw, &ww, dim, EPS, offset, &mut want_h, &mut want_y, &mut want_rstd);
            let hw = widen(&narrow::<T>(&want_h));
            rms_norm::rms_norm_forward(&hw, &ww, dim, EPS, offset, &mut want_y, &mut want_rstd);
            check(&format!("add_rms_norm h {what}"), &h, &want_h, EXACT);
            check(&format!("add_rms_norm y {what}"), &y, &want_y, T::tol(REDUCED));
            check(&format!("add_rms_norm rstd {what}"), &rstd, &want_rstd, REDUCED);

            check_backward(dev, &what, [&narrow::<T>(&hw), &w, &dy], Some(&dr), &want_rstd, dim, offset);
        }
    }
}

/// The backward (the fused one when `dr`, the residual's gradient, is given) from the CPU's rstd, so that it is
/// checked on its own, against the CPU twin on the widened inputs: with dw, and without (a frozen weight: a grid of
/// all resident blocks, no partial sums).
fn check_backward<T: Elem>(
    dev: &CudaDevice,
    what: &str,
    [x, w, dy]: [&[T]; 3],
    dr: Option<&[T]>,
    rstd: &[f32],
    dim: usize,
    offset: f32,
) {
    let op = if dr.is_some() { "add_rms_norm" } else { "rms_norm" };
    let (mut want_dx, mut want_dw) = (vec![0.0f32; x.len()], vec![0.0f32; dim]);
    let (xw, ww, dyw, drw) = (widen(x), widen(w), widen(dy), dr.map(widen));
    rms_norm::rms_norm_backward(&xw, &ww, rstd, &dyw, drw.as_deref(), dim, offset, &mut want_dx, Some(&mut want_dw));
    let (gx, gw, gr, gdy, gdr) =
        (upload(dev, x), upload(dev, w), upload(dev, rstd), upload(dev, dy), dr.map(|d| upload(dev, d)));
    for with_dw in [true, false] {
        let (mut dx, mut dw) = (poisoned::<T>(dev, x.len()), poisoned::<T>(dev, dim));
        let dw_arg = with_dw.then_some(&mut dw);
        cuda::rms_norm::rms_norm_backward(&gx, &gw, &gr, &gdy, gdr.as_ref(), dim, offset, &mut dx, dw_arg).unwrap();
        let without = if with_dw { "" } else { " without dw" };
        check(&format!("{op} dx{without} {what}"), &dx, &want_dx, T::tol(REDUCED));
        if with_dw {
            check(&format!("{op} dw {what}"), &dw, &want_dw, T::tol(REDUCED));
        }
    }
}
