//! The runtime ops a training step uses to reuse buffers, on CUDA against the CPU: NF4 dequantization (one launch,
//! double quantization included) into a fresh tensor or into the front of a scratch tensor, with each row scaled or
//! not, bit for bit, also for a weight put together on the GPU from its parts (a sharded base's gather);
//! `matmul_into`, which accumulates a product into an existing tensor; and what the LoRA group runs on: column blocks
//! read in place, products written side by side (`matmul_columns`).
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1.

use qlora_kernels::testing::{assert_close, gpu, Tolerance};

/// Two bf16 roundings in sequence (an operand, then the product made from it).
const BF16_TWICE: Tolerance = Tolerance { abs: 5e-2, rel: 2e-2 };
use qlora_kernels::Rng;
use qlora_runtime::ops::concat::cat_rows;
use qlora_runtime::ops::linalg::{matmul, matmul_columns, matmul_into, matmul_scaled};
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
            // The same state put together on the GPU from its parts (as a sharded base gathers it): no host copy.
            let parts = (**cuda.device.as_ref().unwrap()).clone();
            let gathered = Nf4Weight::from_parts(cpu.shape, blocksize, cpu.dtype, parts).unwrap();
            assert_eq!((gathered.device(), gathered.size_in_bytes()), (CUDA, cpu.size_in_bytes()), "{what}");
            let e = gathered.to_device(Device::Cpu).unwrap_err().to_string();
            assert!(e.contains("has no host copy"), "{e}");
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let want = cpu.dequantize(dtype).unwrap();
                let got = cuda.dequantize(dtype).unwrap();
                assert_eq!(got.device(), CUDA);
                assert_eq!(bits(&got), bits(&want), "dequantize {what} {dtype:?}");
                assert_eq!(bits(&gathered.dequantize(dtype).unwrap()), bits(&want), "from parts {what} {dtype:?}");

                let n = shape[0] * shape[1];
                let mut scratch = Tensor::full(&[n + 40], 9.0, dtype).to_device(CUDA).unwrap();
                let view = cuda.dequantize_into(&mut scratch).unwrap();
                assert_eq!((view.shape(), view.device()), (&shape[..], CUDA));
                assert_eq!(bits(&view), bits(&want), "dequantize_into {what} {dtype:?}");
                assert!(scratch.to_vec::<f64>()[n..].iter().all(|&v| v == 9.0), "{what}: scratch past the weight");
                // Each row scaled in the dequantization (DoRA's m/n), where rows are whole blocks.
                if shape[1] % blocksize == 0 {
                    // The GPU casts between f32 and bf16 only; an f16 weight's factors come as f32 (DoRA's m/n is).
                    let g_dtype = if dtype == DType::F16 { DType::F32 } else { dtype };
                    let g = Tensor::randn(&[shape[0]], 1.0, g_dtype, &mut rng);
                    let mut host_scratch = Tensor::zeros(&[n], dtype);
                    let want = cpu.dequantize_scaled_into(&mut host_scratch, &g).unwrap();
                    let got = cuda.dequantize_scaled_into(&mut scratch, &g.to_device(CUDA).unwrap()).unwrap();
                    assert_eq!(bits(&got), bits(&want), "dequantize_scaled_into {what} {dtype:?}");
                }
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

/// The LoRA group's operands on CUDA against the CPU: U = x·[A₀; A₁; A₂]ᵀ from stacked adapters, each
/// projection's slice of U (a column block, read in place) times Bᵢᵀ accumulated into its output, dU written block by
/// block, dB from a column block as the right operand. Ranks 16 (16-byte aligned blocks) and 3 (misaligned ones).
#[test]
fn lora_group_operands_on_cuda_match_cpu() {
    let Some(_dev) = gpu("lora_group_operands_on_cuda_match_cpu") else { return };
    let mut rng = Rng::new(63);
    let (rows, inp) = (40, 96);
    for (ranks, dtype, tol) in [
        // U = x·Aᵀ is rounded to bf16 on the GPU before its second product and kept in f32 on the CPU: a sum of
        // terms each off by one bf16 rounding (0.4%) can land a few percent off where the terms cancel.
        ([16, 16, 16], DType::BF16, BF16_TWICE),
        ([3, 5, 4], DType::BF16, BF16_TWICE),
        ([3, 5, 4], DType::F32, Tolerance { abs: 1e-4, rel: 1e-4 }),
    ] {
        let outs = [48, 16, 24];
        let x = Tensor::randn(&[rows, inp], 1.0, DType::F32, &mut rng).to_dtype(dtype);
        let a: Vec<Tensor> = ranks.iter().map(|&r| Tensor::randn(&[r, inp], 0.1, DType::F32, &mut rng)).collect();
        let b: Vec<Tensor> =
            ranks.iter().zip(outs).map(|(&r, o)| Tensor::randn(&[o, r], 0.1, DType::F32, &mut rng)).collect();
        let dy: Vec<Tensor> =
            outs.iter().map(|&o| Tensor::randn(&[rows, o], 1.0, DType::F32, &mut rng).to_dtype(dtype)).collect();
        let up = |t: &Tensor| t.to_device(CUDA).unwrap();
        let what = format!("ranks {ranks:?} {dtype:?}");
        // Products land in `dtype` on both devices (the CPU computes in f32 and is rounded the same way here), so the
        // two differ by summation order only.
        let run = |x: &Tensor, a: &[Tensor], b: &[Tensor], dy: &[Tensor]| {
            let parts: Vec<Tensor> = a.iter().map(|a| a.try_to_dtype(dtype).unwrap()).collect();
            let a_cat = cat_rows(&parts, &[ranks.iter().sum(), inp], dtype, x.device()).unwrap();
            let u = matmul(x, &a_cat.t().unwrap()).unwrap().to_dtype(dtype);
            let mut out = vec![];
            let mut col = 0;
            for (i, &r) in ranks.iter().enumerate() {
                let ui = u.narrow(1, col, r).unwrap();
                let bi = b[i].to_dtype(dtype);
                let ones = Tensor::ones(&[inp, outs[i]], dtype).to_device(x.device()).unwrap();
                let mut y = matmul(x, &ones).unwrap().to_dtype(dtype);
                matmul_into(&mut y, &ui, &bi.t().unwrap(), 0.5, 1.0).unwrap();
                out.push(y);
                out.push(matmul_scaled(&dy[i].t().unwrap(), &ui, 2.0).unwrap());
                col += r;
            }
            let bs: Vec<Tensor> = b.iter().map(|b| b.to_dtype(dtype).to_device(x.device()).unwrap()).collect();
            let products: Vec<(&Tensor, &Tensor, f64)> = dy.iter().zip(&bs).map(|(d, b)| (d, b, 0.25)).collect();
            out.push(matmul_columns(&products).unwrap());
            out.push(a_cat);
            out
        };
        let want = run(&x, &a, &b, &dy);
        let (ga, gb, gdy): (Vec<_>, Vec<_>, Vec<_>) =
            (a.iter().map(up).collect(), b.iter().map(up).collect(), dy.iter().map(up).collect());
        let got = run(&up(&x), &ga, &gb, &gdy);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!((g.shape(), g.device()), (w.shape(), CUDA), "{what}: output {i}");
            assert_close(&format!("{what}: output {i}"), &g.to_vec::<f64>(), &w.to_vec::<f64>(), tol);
        }
    }
}
