//! Fused ops against the unfused ops they replace, on every device through `test_device!`: `add_rms_norm` (the
//! residual add and the norm that reads it) forward and backward equal `add` then `rms_norm` and the tape's sum of
//! the two gradients — bit for bit on the CPU, where the fused op is the same arithmetic in the same order; within
//! [`F32`] in f32 and [`BF16`] in bf16 on CUDA, where the fused kernel reduces each row in another order (and in
//! bf16 rounds h once, as the unfused add stores it). Odd row widths, both norm offsets (Llama's w, Gemma's 1 + w),
//! and the weight's gradient wanted or not.

use qlora_runtime::ops::elementwise::add;
use qlora_runtime::ops::rms_norm::{add_rms_norm, add_rms_norm_backward, rms_norm, rms_norm_backward};
use qlora_runtime::testing::{assert_close, Tolerance};
use qlora_runtime::{test_device, DType, Device, Rng, Tensor};

/// f32 on CUDA: the same f32 arithmetic, rows reduced in another order (a few ulps on rstd, carried to y and dx).
const F32: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };
/// bf16 on CUDA: both paths round to bf16 (unit roundoff 2⁻⁹); one rounding of difference per element.
const BF16: Tolerance = Tolerance { abs: 1e-2, rel: 1e-2 };

fn values(t: &Tensor) -> Vec<f64> {
    t.to_device(Device::Cpu).unwrap().to_vec::<f64>()
}

fn fused_add_rms_norm_equals_add_then_rms_norm(device: Device) {
    let mut rng = Rng::new(21);
    let dtypes: &[DType] = if device == Device::Cpu { &[DType::F32] } else { &[DType::F32, DType::BF16] };
    for &dtype in dtypes {
        for (rows, dim) in [(1, 8), (5, 96), (3, 1000), (7, 2048), (2, 4101)] {
            for offset in [0.0, 1.0] {
                let t = |shape: &[usize], rng: &mut Rng| {
                    Tensor::randn(shape, 1.0, DType::F32, rng).to_dtype(dtype).to_device(device).unwrap()
                };
                let (x, r, w) = (t(&[rows, dim], &mut rng), t(&[rows, dim], &mut rng), t(&[dim], &mut rng));
                let (dy, dh) = (t(&[rows, dim], &mut rng), t(&[rows, dim], &mut rng));
                let [h, y, rstd] = add_rms_norm(&x, &r, &w, 1e-6, offset).unwrap();
                let h_ref = add(&x, &r).unwrap();
                let (y_ref, rstd_ref) = rms_norm(&h_ref, &w, 1e-6, offset).unwrap();
                for need_dw in [false, true] {
                    let (dx, dw) = add_rms_norm_backward(&h, &w, &rstd, &dy, &dh, offset, need_dw).unwrap();
                    let (dnorm, dw_ref) = rms_norm_backward(&h_ref, &w, &rstd_ref, &dy, offset, need_dw).unwrap();
                    let dx_ref = add(&dh, &dnorm).unwrap();
                    assert_eq!(dw.is_some(), need_dw);
                    let what = format!("{dtype:?} {rows}×{dim} offset {offset}");
                    let pairs =
                        [("h", &h, &h_ref), ("y", &y, &y_ref), ("rstd", &rstd, &rstd_ref), ("dx", &dx, &dx_ref)];
                    let mut pairs: Vec<(&str, &Tensor, &Tensor)> = pairs.to_vec();
                    if let (Some(a), Some(b)) = (&dw, &dw_ref) {
                        pairs.push(("dw", a, b));
                    }
                    for (name, got, want) in pairs {
                        assert_eq!(got.shape(), want.shape(), "{what} {name}");
                        if device == Device::Cpu {
                            assert_eq!(values(got), values(want), "{what} {name}: the same bits on the CPU");
                        } else {
                            let tol = if dtype == DType::BF16 { BF16 } else { F32 };
                            assert_close(&format!("{what} {name}"), &values(got), &values(want), tol);
                        }
                    }
                }
            }
        }
    }
}
test_device!(
    fused_add_rms_norm_equals_add_then_rms_norm,
    fused_add_rms_norm_equals_add_then_rms_norm_cpu,
    fused_add_rms_norm_equals_add_then_rms_norm_cuda
);
