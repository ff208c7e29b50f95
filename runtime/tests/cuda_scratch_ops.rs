//! The runtime ops a training step uses to reuse buffers, on CUDA against the CPU: NF4 dequantization (one launch,
//! double quantization included) into a fresh tensor or into the front of a scratch tensor, bit for bit; and
//! `matmul_into`, which accumulates a product into an existing tensor.
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1.

use qlora_kernels::testing::{assert_close, gpu, Tolerance};
use qlora_kernels::Rng;
use qlora_runtime::ops::linalg::matmul_into;
use qlora_runtime::quant::Nf4Weight;
use qlora_runtime::{DType, Device, Tensor};

const CUDA: Device = Device::Cuda(0);

fn bits(t: &Tensor) -> Vec<u64> {
    t.to_vec::<f64>().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn nf4_dequantizes_on_the_device_bit_for_bit() {
    let Some(_dev) = gpu("nf4_dequantizes_on_the_device_bit_for_bit") else { return };
    let mut rng = Rng::new(61);
    // [96, 320] takes the vector path; [7, 33] (231 elements, odd) only the element-by-element one.
    for (shape, blocksize) in [([96, 320], 64), ([7, 33], 32), ([64, 100], 128)] {
        for double_quant in [false, true] {
            let w = Tensor::randn(&shape, 0.02, DType::BF16, &mut rng);
            let cpu = Nf4Weight::quantize(&w, blocksize, double_quant).unwrap();
            let cuda = cpu.to_device(CUDA).unwrap();
            let what = format!("{shape:?} block {blocksize} double quant {double_quant}");
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let want = cpu.dequantize(dtype).unwrap();
                let got = cuda.dequantize(dtype).unwrap();
                assert_eq!(got.device(), CUDA);
                assert_eq!(bits(&got), bits(&want), "dequantize {what} {dtype:?}");

                let n = shape[0] * shape[1];
                let mut scratch = Tensor::full(&[n + 40], 9.0, dtype).to_device(CUDA).unwrap();
                let view = cuda.dequantize_into(&mut scratch).unwrap();
                assert_eq!((view.shape(), view.device()), (&shape[..], CUDA));
                assert_eq!(bits(&view), bits(&want), "dequantize_into {what} {dtype:?}");
                assert!(scratch.to_vec::<f64>()[n..].iter().all(|&v| v == 9.0), "{what}: scratch past the weight");
            }
        }
    }
}

#[test]
fn matmul_into_on_cuda_matches_cpu() {
    let Some(_dev) = gpu("matmul_into_on_cuda_matches_cpu") else { return };
    let mut rng = Rng::new(62);
    let (m, k, n) = (33, 65, 17);
    let x = Tensor::randn(&[2, m, k], 1.0, DType::F32, &mut rng);
    let w = Tensor::randn(&[n, k], 1.0, DType::F32, &mut rng);
    // (c's dtype, the operands' dtype, tolerance): the product runs in c's dtype.
    let cases = [
        (DType::F32, DType::F32, Tolerance { abs: 1e-4, rel: 1e-4 }),
        (DType::BF16, DType::BF16, Tolerance::BF16),
        (DType::BF16, DType::F32, Tolerance::BF16),
        (DType::F32, DType::BF16, Tolerance { abs: 1e-4, rel: 1e-4 }),
    ];
    for (c_dtype, dtype, tol) in cases {
        let (x, w) = (x.to_dtype(dtype), w.to_dtype(dtype));
        let (gx, gw) = (x.to_device(CUDA).unwrap(), w.to_device(CUDA).unwrap());
        for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.75)] {
            let c0 = if beta == 0.0 {
                Tensor::full(&[2, m, n], f64::NAN, c_dtype)
            } else {
                Tensor::randn(&[2, m, n], 1.0, c_dtype, &mut rng)
            };
            // The CPU reads the operands as CUDA does: cast to c's dtype.
            let mut want = c0.clone();
            let (cx, cw) = (x.to_dtype(c_dtype), w.to_dtype(c_dtype));
            matmul_into(&mut want, &cx, &cw.t().unwrap(), alpha, beta).unwrap();
            let mut got = c0.to_device(CUDA).unwrap();
            let kept = got.clone();
            matmul_into(&mut got, &gx, &gw.t().unwrap(), alpha, beta).unwrap();
            let what = format!("c {c_dtype:?}, operands {dtype:?}, α {alpha} β {beta}");
            assert_eq!((got.dtype(), got.device()), (c_dtype, CUDA), "{what}");
            assert_close(&what, &got.to_vec::<f64>(), &want.to_vec::<f64>(), tol);
            assert_eq!(bits(&kept), bits(&c0), "{what}: a tensor sharing c's storage keeps its values");
        }
    }
}
