//! AdamW on CUDA (f32 moments beside the parameters, the fused kernel) against the CPU optimizer (f64 host moments)
//! on random parameters and gradients of odd sizes, with weight decay and global-norm clipping; and the optimizer
//! state moving between the two (the checkpoint's f64 moments), so that a CPU checkpoint resumes on a GPU.
//!
//! Tolerance: |gpu − cpu| ≤ 1e-6 + 1e-5·|cpu| per element ([`ABS`], [`REL`]). The gradients are identical (p ⊙ c
//! summed: ∂/∂p = c exactly on both devices); what differs is f32 arithmetic in the kernel against f64 on the host
//! and the order of the norm's reduction, a few f32 ulps per step (6e-8 each) over six steps: 1e-5 relative leaves
//! a wide margin and still catches a wrong bias correction, decay or clipping factor (errors of order lr).
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1.

use qlora_autograd::{Param, Tape, Var};
use qlora_optim::{clip_grad_norm, AdamW, AdamWConfig};
use qlora_runtime::testing::gpu;
use qlora_runtime::Rng;
use qlora_runtime::{DType, Device, Tensor};

const CUDA: Device = Device::Cuda(0);
const ABS: f64 = 1e-6;
const REL: f64 = 1e-5;

/// Odd sizes: a partial last block in the kernel's grid, and one parameter past a block of 256 threads.
const SHAPES: [&[usize]; 3] = [&[7, 33], &[1], &[3, 301]];

/// Random trainable parameters `p0`, `p1`, … of [`SHAPES`] on `device`.
fn params(rng: &mut Rng, device: Device) -> Vec<Param> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            Param::trainable(format!("p{i}"), Tensor::randn(s, 0.5, DType::F32, rng).to_device(device).unwrap())
        })
        .collect()
}

/// Sets every parameter's gradient to its coefficient tensor: backward of Σ p ⊙ c.
fn set_grads(params: &[Param], coefs: &[Tensor]) {
    let tape = Tape::new();
    for (p, c) in params.iter().zip(coefs) {
        let v = tape.param(p);
        let c = Var::constant(c.to_device(p.value().device()).unwrap());
        let loss = tape.sum(&tape.mul(&v, &c).unwrap()).unwrap();
        tape.backward(&loss).unwrap();
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = 0.0f64;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(err <= ABS + REL * w.abs(), "{what}[{i}]: gpu {g} vs cpu {w}");
        worst = worst.max(err / (ABS + REL * w.abs()));
    }
    println!("  {what}: worst error {worst:.3} of the bound");
}

#[test]
fn adamw_on_cuda_matches_cpu_with_clipping_and_decay() {
    if gpu("adamw_on_cuda_matches_cpu_with_clipping_and_decay").is_none() {
        return;
    }
    let mut rng = Rng::new(11);
    let cpu = params(&mut rng, Device::Cpu);
    let gpu: Vec<Param> = cpu.iter().map(|p| Param::trainable(p.name(), p.value().to_device(CUDA).unwrap())).collect();
    let config = AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() };
    let mut cpu_opt = AdamW::new(cpu.clone(), config).unwrap();
    let mut gpu_opt = AdamW::new(gpu.clone(), config).unwrap();
    for step in 1..=6u64 {
        // Gradients large enough that clipping to 1.0 scales them every step.
        let coefs: Vec<Tensor> = SHAPES.iter().map(|s| Tensor::randn(s, 2.0, DType::F32, &mut rng)).collect();
        set_grads(&cpu, &coefs);
        set_grads(&gpu, &coefs);
        let (cn, gn) = (clip_grad_norm(&cpu, 1.0).unwrap(), clip_grad_norm(&gpu, 1.0).unwrap());
        assert!(cn > 1.0, "clipping must act for the test to cover it (norm {cn})");
        assert!((cn - gn).abs() <= 1e-5 * cn, "step {step}: norm gpu {gn} vs cpu {cn}");
        cpu_opt.set_lr(1e-2 / step as f64);
        gpu_opt.set_lr(1e-2 / step as f64);
        cpu_opt.step().unwrap();
        gpu_opt.step().unwrap();
        for p in &gpu {
            assert_eq!(p.value().device(), CUDA, "{}: stays on the GPU", p.name());
            assert!(p.grad().is_none(), "{}: step clears the gradient", p.name());
        }
    }
    for (c, g) in cpu.iter().zip(&gpu) {
        assert_close(c.name(), &g.value().try_to_vec::<f64>().unwrap(), &c.value().to_vec::<f64>());
    }
    let (cs, gs) = (cpu_opt.state().unwrap(), gpu_opt.state().unwrap());
    assert_eq!(gs.step, cs.step);
    for (c, g) in cs.moments.iter().zip(&gs.moments) {
        assert_eq!(c.name, g.name);
        assert_close(&format!("{}.exp_avg", c.name), &g.exp_avg, &c.exp_avg);
        assert_close(&format!("{}.exp_avg_sq", c.name), &g.exp_avg_sq, &c.exp_avg_sq);
    }
}

#[test]
fn a_cpu_optimizer_state_resumes_on_cuda() {
    if gpu("a_cpu_optimizer_state_resumes_on_cuda").is_none() {
        return;
    }
    let mut rng = Rng::new(12);
    let shape = [5, 17];
    let config = AdamWConfig { lr: 5e-3, weight_decay: 0.01, ..Default::default() };
    let cpu = Param::trainable("w", Tensor::randn(&shape, 1.0, DType::F32, &mut rng));
    let mut cpu_opt = AdamW::new(vec![cpu.clone()], config).unwrap();
    let coefs: Vec<Tensor> = (0..6).map(|_| Tensor::randn(&shape, 1.0, DType::F32, &mut rng)).collect();
    for c in &coefs[..3] {
        set_grads(std::slice::from_ref(&cpu), std::slice::from_ref(c));
        cpu_opt.step().unwrap();
    }
    // What a checkpoint holds: the values and the f64 moments. Loaded into a GPU optimizer, the run goes on there.
    let gpu = Param::trainable("w", cpu.value().to_device(CUDA).unwrap());
    let mut gpu_opt = AdamW::new(vec![gpu.clone()], config).unwrap();
    gpu_opt.load_state(&cpu_opt.state().unwrap()).unwrap();
    assert_eq!(gpu_opt.steps_taken(), 3);
    for c in &coefs[3..] {
        set_grads(std::slice::from_ref(&cpu), std::slice::from_ref(c));
        cpu_opt.step().unwrap();
        set_grads(std::slice::from_ref(&gpu), std::slice::from_ref(c));
        gpu_opt.step().unwrap();
    }
    assert_close("w", &gpu.value().try_to_vec::<f64>().unwrap(), &cpu.value().to_vec::<f64>());
    // And back: the GPU's state loads into a CPU optimizer.
    let mut back =
        AdamW::new(vec![Param::trainable("w", gpu.value().to_device(Device::Cpu).unwrap())], config).unwrap();
    back.load_state(&gpu_opt.state().unwrap()).unwrap();
    assert_eq!(back.steps_taken(), 6);
}

/// Paged moments (parked in pinned host memory between updates) give the same bits as resident ones over several
/// clipped updates, through a change of mode mid-run and a state round trip; on the CPU paging is a no-op.
#[test]
fn paged_moments_update_the_same_bits() {
    let run = |device: Device, paged_from: Option<usize>| {
        let mut rng = Rng::new(12);
        let params = params(&mut rng, device);
        let mut opt =
            AdamW::new(params.clone(), AdamWConfig { lr: 1e-2, weight_decay: 0.1, ..Default::default() }).unwrap();
        for step in 0..5 {
            if paged_from == Some(step) {
                opt.set_paged(true).unwrap();
            }
            let coefs: Vec<Tensor> = SHAPES.iter().map(|s| Tensor::randn(s, 1.0, DType::F32, &mut rng)).collect();
            set_grads(&params, &coefs);
            let norm = opt.grad_norm_sq().unwrap();
            opt.step_clipped(&norm, 0.5).unwrap();
        }
        let state = opt.state().unwrap();
        opt.load_state(&state).unwrap();
        assert_eq!(opt.state().unwrap(), state, "a state round trip keeps paged moments");
        let values: Vec<Vec<f64>> = params.iter().map(|p| p.value().try_to_vec::<f64>().unwrap()).collect();
        (values, state)
    };
    assert_eq!(run(Device::Cpu, Some(0)), run(Device::Cpu, None), "CPU");
    let Some(dev) = gpu("paged_moments_update_the_same_bits") else { return };
    let resident = run(CUDA, None);
    for paged_from in [0, 2] {
        assert!(run(CUDA, Some(paged_from)) == resident, "paged from update {paged_from}: other bits");
    }
    assert!(dev.pinned_stats().reserved > 0, "the moments went through pinned memory");
}
