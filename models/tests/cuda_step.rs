//! A QLoRA training step of the tiny Llama on CUDA against the same step on the CPU (issue #6): NF4 base (double
//! quantized), LoRA on every linear layer with nonzero B so that every adapter gradient is nontrivial, a packed batch
//! of three sequences, gradient checkpointing on. The CPU computes in f32; CUDA runs (a) in f32 and (b) in bf16.
//!
//! Tolerances, normwise (‖got − cpu‖ / ‖cpu‖ over each tensor, which ignores the relative noise of near-zero entries):
//! - CUDA f32: [`F32_NORMWISE`] = 1e-4. The same f32 arithmetic in another summation order (cuBLASLt, block
//!   reductions, flash attention's online softmax) moves results by a few ulps per op; 1e-4 leaves two orders of
//!   magnitude above f32's 6e-8 unit roundoff for the ~30 ops between loss and a gradient, and is far below any bug.
//! - CUDA bf16: [`BF16_NORMWISE`] = 2e-2. bf16 keeps 8 significant bits (unit roundoff 2^-9 ≈ 2e-3); every
//!   activation and the dequantized weights are rounded once per op, so a gradient carries a sum of ~20–40
//!   independent roundings of relative size ≤ 2e-3, about √30·2e-3 ≈ 1e-2 at one standard deviation of the random
//!   walk; 2e-2 allows that with margin while still catching a wrong scale, sign or missing term (errors of order
//!   1). The loss (mean cross-entropy reduced in f32 from bf16 logits) gets the same bound; DoRA's magnitude
//!   gradients get [`BF16_MAGNITUDE_NORMWISE`].
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1. The fixture is found through CARGO_MANIFEST_DIR, or QLORA_FIXTURES (the `tests/fixtures`
//! folder) when the binary runs elsewhere.

use qlora_autograd::{LoraAdapter, LoraConfig, Tape};
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_runtime::ops::linalg::matmul;
use qlora_runtime::testing::{fixtures_dir, gpu};
use qlora_runtime::Rng;
use qlora_runtime::{DType, Device, Error, Tensor};
use std::path::PathBuf;

const F32_NORMWISE: f64 = 1e-4;
const BF16_NORMWISE: f64 = 2e-2;
/// DoRA's magnitude gradients in bf16: dm = Σ_tokens(dy ⊙ h) / n is a dot product over tokens whose terms cancel
/// (dm is ~1/√tokens of the terms' size for random signs, √29 ≈ 5 here), so each term's bf16 rounding weighs more
/// against the result than in A's and B's gradients. Measured on the H200: 2.2e-2 at most; errors of order 1 still
/// fail.
const BF16_MAGNITUDE_NORMWISE: f64 = 4e-2;
const CUDA: Device = Device::Cuda(0);

fn llama_dir() -> PathBuf {
    fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama")
}

/// The tiny Llama as NF4 (double quantized, block 64) with a rank-4 adapter on every projection, B ~ N(0, 0.05²).
fn qlora_model() -> CausalLm {
    adapted_model(false, 0.0)
}

/// [`qlora_model`] with LoRA or DoRA adapters (DoRA's magnitudes start at the base's row norms, as peft's do) and
/// this adapter dropout.
fn adapted_model(use_dora: bool, dropout: f64) -> CausalLm {
    let mut model = CausalLm::load(&llama_dir(), BaseFormat::Nf4 { blocksize: 64, double_quant: true }).unwrap();
    model.gradient_checkpointing = true;
    let mut rng = Rng::new(6);
    let config = LoraConfig { r: 4, alpha: 8.0, use_dora, dropout, ..LoraConfig::default() };
    for p in model.projections_mut().unwrap() {
        let ad = LoraAdapter::new(&p.name, &p.base, &config, &mut rng).unwrap();
        let b_shape = ad.lora_b.value().shape().to_vec();
        ad.lora_b.set_value(Tensor::randn(&b_shape, 0.05, DType::F32, &mut rng));
        p.adapter = Some(ad);
    }
    model
}

/// Three packed sequences of random tokens (lengths 9, 14 and 6), a few labels masked.
fn batch(vocab: usize) -> Batch {
    let mut rng = Rng::new(7);
    let seqs: Vec<(Vec<i32>, Vec<i32>)> = [9usize, 14, 6]
        .iter()
        .map(|&n| {
            let ids: Vec<i32> = (0..n).map(|_| rng.below(vocab as u64) as i32).collect();
            let labels = ids.iter().enumerate().map(|(i, &t)| if i % 5 == 2 { -100 } else { t }).collect();
            (ids, labels)
        })
        .collect();
    Batch::pack(&seqs).unwrap()
}

/// A step's loss and every adapter gradient (by parameter name), as f64.
type StepResult = (f64, Vec<(String, Vec<f64>)>);

/// Forward, loss and backward: the loss and every adapter gradient (by parameter name), downloaded as f64.
fn step(model: &CausalLm, batch: &Batch) -> StepResult {
    let tape = Tape::new();
    let n = batch.trained_tokens() as f64;
    let loss = model.loss(&tape, batch, n, 0).unwrap();
    tape.backward(&loss).unwrap();
    let grads = model
        .trainable_params()
        .iter()
        .map(|p| {
            let g = p.grad().unwrap_or_else(|| panic!("{}: no gradient", p.name()));
            assert_eq!(g.device(), model.embed_tokens.value().device(), "{}: gradient on the model's device", p.name());
            (p.name().to_string(), g.try_to_vec::<f64>().unwrap())
        })
        .collect();
    (loss.value().to_scalar::<f64>().unwrap(), grads)
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// (max |got − want|, ‖got − want‖ / ‖want‖).
fn errors(got: &[f64], want: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let diff: Vec<f64> = got.iter().zip(want).map(|(a, b)| a - b).collect();
    (diff.iter().fold(0.0f64, |m, d| m.max(d.abs())), norm(&diff) / norm(want))
}

/// `model.layers.0.self_attn.q_proj.lora_A.weight` → `q_proj.lora_A`; `….q_proj.lora_magnitude_vector` →
/// `q_proj.magnitude`.
fn group(name: &str) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts.as_slice() {
        [.., proj, "lora_magnitude_vector"] => format!("{proj}.magnitude"),
        [.., proj, factor, _] => format!("{proj}.{factor}"),
        _ => name.to_string(),
    }
}

/// Per group of tensors (same projection and factor over all layers): the worst max-abs and normwise errors.
fn group_errors(got: &[(String, Vec<f64>)], want: &[(String, Vec<f64>)]) -> Vec<(String, f64, f64)> {
    let mut rows: Vec<(String, f64, f64)> = Vec::new();
    for ((name, g), (wname, w)) in got.iter().zip(want) {
        assert_eq!(name, wname);
        assert!(norm(w) > 0.0, "{name}: the CPU gradient is zero, so the comparison would prove nothing");
        let (max, rel) = errors(g, w);
        let key = group(name);
        match rows.iter_mut().find(|r| r.0 == key) {
            Some(r) => {
                r.1 = r.1.max(max);
                r.2 = r.2.max(rel);
            }
            None => rows.push((key, max, rel)),
        }
    }
    rows
}

#[test]
fn llama_qlora_step_matches_cpu() {
    step_matches_cpu("llama_qlora_step_matches_cpu", false, 0.0);
}

/// The same with adapter dropout 0.1: the masks are functions of (seed, element), so both devices drop the same
/// elements, and a bf16 GPU takes the fused dropout products (`ops::lora`: dropout(x)·Aᵀ in forward and recompute,
/// dx += dropout(du·A) in backward) where the CPU runs dropout and the products apart.
#[test]
fn llama_qlora_step_with_dropout_matches_cpu() {
    step_matches_cpu("llama_qlora_step_with_dropout_matches_cpu", false, 0.1);
}

/// The same with DoRA adapters: the weight norms, magnitude ratio, scalings and combined output on the GPU
/// (`kernels/cuda/dora.cu`), and the magnitude vectors' gradients beside A's and B's.
#[test]
fn llama_qdora_step_matches_cpu() {
    step_matches_cpu("llama_qdora_step_matches_cpu", true, 0.0);
}

/// DoRA with dropout 0.1: peft's formula takes two base products (W·x and W·dropout(x)), both from the shared
/// dequantization scratch, and its backward the same again.
#[test]
fn llama_qdora_step_with_dropout_matches_cpu() {
    step_matches_cpu("llama_qdora_step_with_dropout_matches_cpu", true, 0.1);
}

fn step_matches_cpu(test: &str, use_dora: bool, dropout: f64) {
    let Some(name) = gpu(test) else { return };
    let cpu_model = adapted_model(use_dora, dropout);
    let cpu_batch = batch(cpu_model.config.vocab_size);
    let (cpu_loss, cpu_grads) = step(&cpu_model, &cpu_batch);
    let per_projection = if use_dora { 3 } else { 2 };
    assert_eq!(cpu_grads.len(), per_projection * 7 * cpu_model.layers.len(), "A, B (and m) of 7 projections per layer");

    let gpu_batch = cpu_batch.to_device(CUDA).unwrap();
    let mut results = Vec::new();
    for (dtype, bound) in [(DType::F32, F32_NORMWISE), (DType::BF16, BF16_NORMWISE)] {
        let model = cpu_model.to_device(CUDA, dtype).unwrap();
        let (loss, grads) = step(&model, &gpu_batch);
        let loss_rel = (loss - cpu_loss).abs() / cpu_loss.abs();
        results.push((dtype, bound, loss, loss_rel, group_errors(&grads, &cpu_grads)));
    }

    println!("qlora-gpu: {test}: CPU f32 loss {cpu_loss:.7} on {name}");
    println!("{:<18} {:>12} {:>12} {:>12} {:>12}", "tensor group", "f32 max", "f32 norm", "bf16 max", "bf16 norm");
    let (f32_rows, bf16_rows) = (&results[0].4, &results[1].4);
    for (a, b) in f32_rows.iter().zip(bf16_rows) {
        println!("{:<18} {:>12.3e} {:>12.3e} {:>12.3e} {:>12.3e}", a.0, a.1, a.2, b.1, b.2);
    }
    for (dtype, bound, loss, loss_rel, rows) in &results {
        println!("loss {dtype:?}: {loss:.7} (relative error {loss_rel:.3e}, bound {bound:.0e})");
        assert!(*loss_rel <= *bound, "{dtype:?} loss {loss} vs CPU {cpu_loss}: relative error {loss_rel:.3e}");
        for (group, _, rel) in rows {
            let bound =
                if *dtype == DType::BF16 && group.ends_with(".magnitude") { BF16_MAGNITUDE_NORMWISE } else { *bound };
            assert!(*rel <= bound, "{dtype:?} {group}: normwise error {rel:.3e} > {bound:.0e}");
        }
    }
}

#[test]
fn mixed_devices_are_an_error_naming_op_and_devices() {
    let test = "mixed_devices_are_an_error_naming_op_and_devices";
    if gpu(test).is_none() {
        return;
    }
    let a = Tensor::ones(&[2, 3], DType::F32);
    let b = Tensor::ones(&[3, 2], DType::F32).to_device(CUDA).unwrap();
    let err = matmul(&a, &b).unwrap_err();
    assert!(matches!(err, Error::DeviceMismatch { op: "matmul", a: Device::Cpu, b: CUDA }), "{err}");
    assert!(err.to_string().contains("cpu") && err.to_string().contains("cuda:0"), "{err}");
    // The GPU result itself, and a round trip that keeps the values.
    let c = matmul(&a.to_device(CUDA).unwrap(), &b).unwrap();
    assert_eq!(c.device(), CUDA);
    assert_eq!(c.to_device(Device::Cpu).unwrap().to_vec::<f32>(), vec![3.0; 4]);
    let mut t = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3]).unwrap().to_device(CUDA).unwrap();
    t.update::<f32>(|v| v[1] = 7.0).unwrap();
    assert_eq!((t.device(), t.to_vec::<f32>()), (CUDA, vec![1.0, 7.0, 3.0]));
    assert!(Tensor::zeros(&[2], DType::F64).to_device(CUDA).is_err(), "f64 has no CUDA kernels");
}

/// The step of `model` with none, the first and all of its checkpointed layer inputs (the fixture has two layers)
/// offloaded to pinned host memory, the rest kept on its device: each on fresh adapter parameters so that gradients
/// do not accumulate across the three.
fn partly_offloaded(model: &CausalLm, device: Device, dtype: DType, batch: &Batch) -> [StepResult; 3] {
    assert_eq!(model.layers.len(), 2, "one layer offloaded is a partial count");
    [0, 1, 2].map(|offload| step_as(model, device, dtype, batch, |m| m.offload_layers = offload))
}

/// The step of a fresh copy of `model` on `device` in `dtype`, with `plan` applied to the copy (which layers keep,
/// offload or park what).
fn step_as(
    model: &CausalLm,
    device: Device,
    dtype: DType,
    batch: &Batch,
    plan: impl FnOnce(&mut CausalLm),
) -> StepResult {
    let mut m = model.to_device(device, dtype).unwrap();
    plan(&mut m);
    step(&m, batch)
}

/// Offloading the checkpointed layer inputs, some or all, trains the same bits as keeping them: the copies are exact,
/// and the stream ordering (copy out fenced before the source's memory is reused, copy back awaited before the
/// recompute) delivers every input intact. On the CPU the handles only hold the tensors; on CUDA the inputs go
/// through pinned memory on the copy stream.
#[test]
fn offloaded_checkpoints_train_the_same_bits() {
    let test = "offloaded_checkpoints_train_the_same_bits";
    let model = qlora_model();
    let cpu_batch = batch(model.config.vocab_size);
    let [plain, first, all] = partly_offloaded(&model, Device::Cpu, DType::F32, &cpu_batch);
    assert!(plain == first && plain == all, "CPU");
    let Some(name) = gpu(test) else { return };
    let gpu_batch = cpu_batch.to_device(CUDA).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        let [plain, first, all] = partly_offloaded(&model, CUDA, dtype, &gpu_batch);
        for (offloaded, what) in [(first, "the first layer's input"), (all, "every layer input")] {
            assert_eq!(plain.0.to_bits(), offloaded.0.to_bits(), "{dtype:?} loss, {what} offloaded");
            assert!(plain.1 == offloaded.1, "{dtype:?}: an adapter gradient changed when {what} was offloaded");
        }
    }
    let pinned = qlora_runtime::cuda_device(0).unwrap().pinned_stats();
    assert!(pinned.reserved > 0, "the layer inputs went through pinned memory");
    println!("qlora-gpu: {test}: bit-identical in f32 and bf16, one or both layer inputs offloaded, on {name}");
}

/// The step of `model` with `keep` layers kept on the device and `park` parked in host memory (the rest recomputed).
fn kept_and_parked(
    model: &CausalLm,
    device: Device,
    dtype: DType,
    batch: &Batch,
    keep: usize,
    park: usize,
) -> StepResult {
    step_as(model, device, dtype, batch, |m| (m.keep_layers, m.park_layers) = (keep, park))
}

/// Parking layers (their activations in pinned host memory from forward to backward, nothing recomputed) trains the
/// same bits as keeping those layers' activations on the device: the copies are exact, every buffer a layer's ops
/// keep goes and comes back whole, and none is read while it is away (no fault). With both layers of the fixture
/// parked, the first one's activations really leave the device (the second one's scope lets them go); the last
/// parked layer's stay, as its backward comes first. On the CPU parked layers are simply kept.
#[test]
fn parked_layers_train_the_same_bits_as_kept_ones() {
    let test = "parked_layers_train_the_same_bits_as_kept_ones";
    let model = qlora_model();
    let cpu_batch = batch(model.config.vocab_size);
    for n in [1, 2] {
        let kept = kept_and_parked(&model, Device::Cpu, DType::F32, &cpu_batch, n, 0);
        assert!(kept == kept_and_parked(&model, Device::Cpu, DType::F32, &cpu_batch, 0, n), "CPU, {n} parked");
    }
    let Some(name) = gpu(test) else { return };
    let faults = qlora_runtime::park::faults();
    let gpu_batch = cpu_batch.to_device(CUDA).unwrap();
    for dtype in [DType::F32, DType::BF16] {
        for n in [1, 2] {
            let kept = kept_and_parked(&model, CUDA, dtype, &gpu_batch, n, 0);
            let parked = kept_and_parked(&model, CUDA, dtype, &gpu_batch, 0, n);
            assert_eq!(kept.0.to_bits(), parked.0.to_bits(), "{dtype:?} loss, {n} layers parked");
            assert!(kept.1 == parked.1, "{dtype:?}: an adapter gradient changed with {n} layers parked");
        }
    }
    assert_eq!(qlora_runtime::park::faults(), faults, "a parked buffer was read before its layer's backward");
    println!("qlora-gpu: {test}: bit-identical in f32 and bf16 with one or both layers parked, no fault, on {name}");
}

/// A recomputed layer records down_proj for its gradients alone (its value reaches the checkpoint's output only
/// through the residual add): checkpointing still trains the same bits as keeping every activation, for LoRA and for
/// DoRA (whose magnitude gradient reads the value, so it is computed), with the MLP whole and in blocks of 4 tokens.
/// On the CPU in f32; on CUDA the attention backward's dQ atomics reorder sums from run to run.
#[test]
fn checkpointing_trains_the_same_bits_as_keeping_activations() {
    for use_dora in [false, true] {
        let model = adapted_model(use_dora, 0.0);
        let batch = batch(model.config.vocab_size);
        for chunk in [None, Some(4)] {
            let run = |checkpointing: bool| {
                let mut m = model.to_device(Device::Cpu, DType::F32).unwrap();
                m.gradient_checkpointing = checkpointing;
                m.mlp_chunk_tokens = chunk;
                step(&m, &batch)
            };
            assert!(run(true) == run(false), "DoRA {use_dora}, MLP blocks {chunk:?}: checkpointing changed a bit");
        }
    }
}

/// SmolLM2-135M's shape with random NF4 weights and rank-8 adapters, and one random sequence of 2048 tokens on the
/// GPU in bf16: layers whose activations show in the allocator's peak (30 layer inputs of 2.25 MiB).
fn smollm2_step(seed: u64) -> (CausalLm, Batch) {
    let config = qlora_models::synthetic::shape_config("smollm2-135m").unwrap();
    let format = BaseFormat::Nf4 { blocksize: 64, double_quant: true };
    let mut model = qlora_models::synthetic::build(&config, format, DType::BF16, 1).unwrap();
    let mut rng = Rng::new(seed);
    let lora = LoraConfig { r: 8, alpha: 16.0, ..LoraConfig::default() };
    for p in model.projections_mut().unwrap() {
        p.adapter = Some(LoraAdapter::new(&p.name, &p.base, &lora, &mut rng).unwrap());
    }
    let ids: Vec<i32> = (0..2048).map(|_| rng.below(config.vocab_size as u64) as i32).collect();
    let batch = Batch::pack(&[(ids.clone(), ids)]).unwrap().to_device(CUDA).unwrap();
    (model, batch)
}

/// Offloading takes the layer inputs off the GPU: the allocator's peak drops by all but the two inputs that are on the
/// device at once in backward (one in use, the next one arriving); offloading the first half of them, by the half (at
/// least by the half less those two). SmolLM2-135M's shape with random NF4 weights, one sequence of 2048 tokens in
/// bf16: 30 layer inputs of 2.25 MiB. The steps run from the most offloaded to the least, so that the device's peak
/// (a maximum since the process started) is each step's own before the next one raises it.
#[test]
fn offloaded_checkpoints_lower_the_peak() {
    let test = "offloaded_checkpoints_lower_the_peak";
    let Some(name) = gpu(test) else { return };
    let (model, batch) = smollm2_step(2);
    let (config, tokens) = (model.config.clone(), 2048);
    let dev = qlora_runtime::cuda_device(0).unwrap();
    let layers = config.num_hidden_layers;
    let mut peaks = Vec::new();
    for offload_layers in [layers, layers / 2, 0] {
        let mut m = model.to_device(CUDA, DType::BF16).unwrap();
        m.offload_layers = offload_layers;
        step(&m, &batch);
        peaks.push(dev.memory_stats().peak);
    }
    let input = tokens * config.hidden_size * 2;
    for (peak, offloaded) in [(peaks[0], layers), (peaks[1], layers / 2)] {
        let expected = (offloaded - 2) * input;
        let saved = peaks[2] - peak;
        println!(
            "qlora-gpu: {test}: peak {peak} B with {offloaded} of {layers} inputs offloaded, {} B with none: {saved} B \
             saved, {expected} B expected on {name}",
            peaks[2]
        );
        assert!(saved as f64 >= 0.75 * expected as f64, "offloading {offloaded} saved {saved} B of the {expected}");
    }
}

/// Parking takes kept layers' activations off the GPU: SmolLM2-135M's shape with random NF4 weights, one sequence
/// of 2048 tokens in bf16, every layer kept on the device, every layer parked, every layer recomputed. Parked, the
/// step holds at most a few layers' activations at once (one leaving while the next runs, one in use and one arriving
/// in backward, and the last one), so its peak comes down to the recomputing step's, give or take those: the test
/// asks for at least two thirds of the way from keeping to recomputing. The steps run from the leanest to the
/// largest, so that the device's peak (a maximum since the process started) is each step's own.
#[test]
fn parked_layers_lower_the_peak() {
    let test = "parked_layers_lower_the_peak";
    let Some(name) = gpu(test) else { return };
    let (model, batch) = smollm2_step(3);
    let config = model.config.clone();
    let dev = qlora_runtime::cuda_device(0).unwrap();
    let layers = config.num_hidden_layers;
    let faults = qlora_runtime::park::faults();
    let mut peaks = Vec::new();
    for (keep, park) in [(0, 0), (0, layers), (layers, 0)] {
        let mut m = model.to_device(CUDA, DType::BF16).unwrap();
        (m.gradient_checkpointing, m.keep_layers, m.park_layers) = (true, keep, park);
        step(&m, &batch);
        peaks.push(dev.memory_stats().peak);
    }
    let [recomputing, parked, kept] = [peaks[0], peaks[1], peaks[2]];
    println!(
        "qlora-gpu: {test}: peak {recomputing} B recomputing, {parked} B parked, {kept} B kept ({layers} layers) on \
         {name}"
    );
    assert!(kept > recomputing, "keeping every layer holds more than recomputing them");
    assert!(parked <= kept - (kept - recomputing) * 2 / 3, "parking every layer left the peak at {parked} B");
    assert_eq!(qlora_runtime::park::faults(), faults, "a parked buffer was read before its layer's backward");
}

/// The MLP run a block of tokens at a time (each block its own checkpoint) computes the same loss and the same
/// gradients up to the order of the adapters' sums over tokens, and a layer's backward then holds one block's MLP
/// activations: the tape's peak of saved bytes drops. Blocks of 4 tokens over the batch's 29, on the CPU (and on
/// CUDA in f32 where a GPU is present).
#[test]
fn a_blocked_mlp_trains_the_same_values_with_less_saved() {
    let test = "a_blocked_mlp_trains_the_same_values_with_less_saved";
    let model = qlora_model();
    let cpu_batch = batch(model.config.vocab_size);
    let run = |device: Device, chunk: Option<usize>, batch: &Batch| {
        let mut m = model.to_device(device, DType::F32).unwrap();
        m.mlp_chunk_tokens = chunk;
        let tape = Tape::new();
        let loss = m.loss(&tape, batch, batch.trained_tokens() as f64, 0).unwrap();
        tape.backward(&loss).unwrap();
        let grads: Vec<Vec<f64>> =
            m.trainable_params().iter().map(|p| p.grad().unwrap().try_to_vec::<f64>().unwrap()).collect();
        (loss.value().to_scalar::<f64>().unwrap(), grads, tape.saved_bytes().peak())
    };
    let mut devices = vec![(Device::Cpu, cpu_batch.clone())];
    if let Some(name) = gpu(test) {
        println!("qlora-gpu: {test}: also on {name}");
        devices.push((CUDA, cpu_batch.to_device(CUDA).unwrap()));
    }
    for (device, batch) in devices {
        let (whole, blocked) = (run(device, None, &batch), run(device, Some(4), &batch));
        assert!((whole.0 - blocked.0).abs() <= 1e-6 * whole.0.abs(), "{device}: loss {} vs {}", whole.0, blocked.0);
        for (g, w) in blocked.1.iter().zip(&whole.1) {
            let (_, rel) = errors(g, w);
            assert!(rel <= 1e-5, "{device}: a gradient moved by {rel:.3e} when the MLP ran in blocks");
        }
        assert!(blocked.2 < whole.2, "{device}: saved-bytes peak {} blocked vs {} whole", blocked.2, whole.2);
    }
}
