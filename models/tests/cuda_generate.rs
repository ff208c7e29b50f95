//! Decoding on the GPU against the CPU, on the tiny fixture models of every family (scripts/reference/tiny_models.py):
//! the KV cache lives on the device and grows there, and the logits of a prompt and of each following step equal the
//! CPU's within [`F32`] (CUDA in f32: the same arithmetic in other summation orders), for one sequence and for two
//! sharing a cache (packed keys), through a failed step that must leave the device cache as it was; greedy
//! generation gives the CPU's tokens, token for token. And an NF4 base with unmerged LoRA adapters, whose decoding
//! steps run the NF4 GEMV on the GPU (the CPU multiplies by the dequantized weights).
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1. The fixtures are found through CARGO_MANIFEST_DIR, or QLORA_FIXTURES (the `tests/fixtures`
//! folder) when the binary runs elsewhere.

use qlora_autograd::{LoraAdapter, LoraConfig};
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::generate::{generate, GenerateOptions, LogitsFor, Sampling};
use qlora_models::kv_cache::KvCache;
use qlora_models::transformer::{BaseFormat, CausalLm};
use qlora_runtime::testing::{assert_close, fixtures_dir, gpu, Tolerance};
use qlora_runtime::{DType, Device, Rng, Tensor};
use std::ops::ControlFlow;

const CUDA: Device = Device::Cuda(0);
/// CUDA f32 against the CPU: the same f32 arithmetic in other summation orders (cuBLASLt, flash attention's online
/// softmax), a few ulps per op over a few dozen ops.
const F32: Tolerance = Tolerance { abs: 1e-4, rel: 1e-4 };

fn load(family: &str) -> (CausalLm, Vec<u32>) {
    let dir = fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models").join(family);
    let model = CausalLm::load(&dir, BaseFormat::Dense(DType::F32)).unwrap();
    let reference = Checkpoint::from_files(&[dir.join("reference.safetensors")]).unwrap();
    let ids = reference.load("input_ids").unwrap().to_vec::<i32>().into_iter().map(|i| i as u32).collect();
    (model, ids)
}

/// The logits of each step of `steps` (token counts per sequence) run through one cache on `model`'s device.
fn stepped(model: &CausalLm, seqs: &[&[u32]], steps: &[&[usize]], which: LogitsFor) -> Vec<Vec<f64>> {
    let mut cache = KvCache::new(&model.config, seqs.len());
    let mut at = vec![0; seqs.len()];
    steps
        .iter()
        .map(|counts| {
            let chunks: Vec<&[u32]> = seqs.iter().zip(&at).zip(*counts).map(|((s, &a), &n)| &s[a..a + n]).collect();
            let logits = model.forward_cached(&mut cache, &chunks, which).unwrap();
            assert_eq!(logits.device(), model.embed_tokens.value().device(), "logits stay where the model runs");
            at.iter_mut().zip(*counts).for_each(|(a, n)| *a += n);
            logits.to_device(Device::Cpu).unwrap().to_vec::<f64>()
        })
        .collect()
}

#[test]
fn decoding_on_cuda_matches_cpu() {
    let test = "decoding_on_cuda_matches_cpu";
    let Some(name) = gpu(test) else { return };
    for family in ["llama", "gemma", "gemma2", "gemma3"] {
        let (cpu, ids) = load(family);
        let cuda = cpu.to_device(CUDA, DType::F32).unwrap();
        // A 5-token prompt, then 1, 2, 1, 3 tokens: past Gemma 2/3's sliding window of 4.
        let one: [&[usize]; 5] = [&[5], &[1], &[2], &[1], &[3]];
        for which in [LogitsFor::All, LogitsFor::Last] {
            let (want, got) = (stepped(&cpu, &[&ids], &one, which), stepped(&cuda, &[&ids], &one, which));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_close(&format!("{family} {which:?} step {i}"), g, w, F32);
            }
        }
        // Two sequences in one cache, one idle for a step: the packed keys of both.
        let (a, b) = (&ids[..9], &ids[3..]);
        let two: [&[usize]; 4] = [&[4, 6], &[1, 0], &[1, 1], &[3, 2]];
        let (want, got) =
            (stepped(&cpu, &[a, b], &two, LogitsFor::Last), stepped(&cuda, &[a, b], &two, LogitsFor::Last));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_close(&format!("{family} two sequences step {i}"), g, w, F32);
        }
        // A failed step (a token past the vocabulary) leaves the device cache as it was: the next step still
        // matches the CPU's.
        let mut cache = KvCache::new(&cuda.config, 1);
        cuda.forward_cached(&mut cache, &[&ids[..3]], LogitsFor::Last).unwrap();
        let bad = cuda.config.vocab_size as u32 + 5;
        assert!(cuda.forward_cached(&mut cache, &[&[ids[3], bad]], LogitsFor::Last).is_err());
        assert_eq!(cache.seq_len(0), 3);
        let next = cuda.forward_cached(&mut cache, &[&ids[3..5]], LogitsFor::All).unwrap();
        let mut cpu_cache = KvCache::new(&cpu.config, 1);
        cpu.forward_cached(&mut cpu_cache, &[&ids[..3]], LogitsFor::Last).unwrap();
        let want = cpu.forward_cached(&mut cpu_cache, &[&ids[3..5]], LogitsFor::All).unwrap().to_vec::<f64>();
        let got = next.to_device(Device::Cpu).unwrap().to_vec::<f64>();
        assert_close(&format!("{family} after a failed step"), &got, &want, F32);

        let options = GenerateOptions { max_new_tokens: 16, sampling: Sampling::Greedy, stop_tokens: vec![] };
        let run = |m: &CausalLm| generate(m, &ids[..5], &options, |_| ControlFlow::Continue(())).unwrap().tokens;
        assert_eq!(run(&cuda), run(&cpu), "{family}: greedy tokens");
        println!("qlora-gpu: {test}: {family} matches the CPU on {name}");
    }
}

#[test]
fn nf4_decoding_with_unmerged_adapters_on_cuda_matches_cpu() {
    let test = "nf4_decoding_with_unmerged_adapters_on_cuda_matches_cpu";
    let Some(name) = gpu(test) else { return };
    let (_, ids) = load("llama");
    let dir = fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama");
    let mut cpu = CausalLm::load(&dir, BaseFormat::Nf4 { blocksize: 64, double_quant: true }).unwrap();
    let mut rng = Rng::new(8);
    let config = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() };
    for p in cpu.projections_mut().unwrap() {
        let ad = LoraAdapter::new(&p.name, &p.base, &config, &mut rng).unwrap();
        let b_shape = ad.lora_b.value().shape().to_vec();
        ad.lora_b.set_value(Tensor::randn(&b_shape, 0.05, DType::F32, &mut rng));
        p.adapter = Some(ad);
    }
    let cuda = cpu.to_device(CUDA, DType::F32).unwrap();
    // A prompt, then one token at a time (one row: the GEMV path), then three (still under its 8 rows).
    let steps: [&[usize]; 5] = [&[5], &[1], &[1], &[3], &[1]];
    let (want, got) = (stepped(&cpu, &[&ids], &steps, LogitsFor::All), stepped(&cuda, &[&ids], &steps, LogitsFor::All));
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_close(&format!("nf4 + lora step {i}"), g, w, F32);
    }
    println!("qlora-gpu: {test}: matches the CPU on {name}");
}
