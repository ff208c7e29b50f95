//! What one runtime op costs the host on CUDA, at decoding's sizes (one row of Llama-3-8B's hidden size): the time to
//! issue a call (checks, dispatch, allocation, the launch itself), which bounds a decode step made of ~30 ops per
//! layer once the GPU finishes each op faster than the host issues the next. A report, not an assertion; without a
//! GPU the test skips.

use qlora_runtime::ops::elementwise::add;
use qlora_runtime::ops::linalg::{matmul, matmul_into};
use qlora_runtime::ops::rms_norm::rms_norm;
use qlora_runtime::quant::Nf4Weight;
use qlora_runtime::testing::gpu_device;
use qlora_runtime::timing::Mark;
use qlora_runtime::{DType, Device, Rng, Tensor};
use std::time::Instant;

/// Calls issued between two waits: few enough that the queue never fills, many enough to time.
const CALLS: usize = 200;

/// Median over 9 batches of the host's microseconds per call of `f`, each batch issued after the device drained.
fn host_us_per_call(device: Device, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..9)
        .map(|_| {
            Mark::now(device).unwrap().wait().unwrap();
            let start = Instant::now();
            (0..CALLS).for_each(|_| f());
            start.elapsed().as_secs_f64() * 1e6 / CALLS as f64
        })
        .collect();
    Mark::now(device).unwrap().wait().unwrap();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

#[test]
fn host_cost_per_op_report() {
    let Some(device) = gpu_device("host_cost_per_op_report") else { return };
    let mut rng = Rng::new(9);
    let on = |shape: &[usize], rng: &mut Rng| {
        Tensor::randn(shape, 0.05, DType::F32, rng).to_dtype(DType::BF16).to_device(device).unwrap()
    };
    let (x, norm_w, a, b) =
        (on(&[1, 4096], &mut rng), on(&[4096], &mut rng), on(&[16, 4096], &mut rng), on(&[4096, 16], &mut rng));
    let w = Tensor::randn(&[4096, 4096], 0.05, DType::F32, &mut rng);
    let w4 = Nf4Weight::quantize(&w, 64, true).unwrap().to_device(device).unwrap();
    let u = matmul(&x, &a.t().unwrap()).unwrap();
    let mut y = w4.gemv(&x, None).unwrap();
    let rows: [(&str, f64); 5] = [
        ("add [1, 4096]", host_us_per_call(device, || drop(add(&x, &x).unwrap()))),
        ("rms_norm [1, 4096]", host_us_per_call(device, || drop(rms_norm(&x, &norm_w, 1e-5, 0.0).unwrap()))),
        ("nf4 gemv 1 x [4096, 4096]", host_us_per_call(device, || drop(w4.gemv(&x, None).unwrap()))),
        ("matmul x·Aᵀ 1 x [16, 4096]", host_us_per_call(device, || drop(matmul(&x, &a.t().unwrap()).unwrap()))),
        (
            "matmul_into y += s·u·Bᵀ 1 x [4096, 16]",
            host_us_per_call(device, || matmul_into(&mut y, &u, &b.t().unwrap(), 2.0, 1.0).unwrap()),
        ),
    ];
    for (op, us) in rows {
        println!("qlora-gpu: host cost per call: {op}: {us:.1} us");
    }
}
