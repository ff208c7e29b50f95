//! `qlora-rt bench decode --shape NAME | --model DIR`: how fast `generate` decodes. The model is built as `bench`
//! builds it, its adapters attached as `bench` attaches them and placed as `generate` places them (on a GPU the NF4
//! base stays packed with the adapters unmerged unless `--merge`; on the CPU they are folded into dense f32). Each
//! sequence of `--batch` gets a prompt of random ids, run as one prefill, then greedy decode steps, each through
//! `CausalLm::forward_cached` with `LogitsFor::Last` and `generate`'s sampler, one host read of the logits per step
//! (the next token must be known before the next step can start).
//!
//! Reported: the prefill's time and tokens/s; the median and p90 wall time of a decode step and its median device
//! time (the difference is host gaps), decode tokens/s; the bytes of weights a step reads (every projection's base,
//! NF4 as packed nibbles plus scales, its adapter, the norms, the lm_head or tied embedding table whole, one
//! embedding row per sequence) and those bytes per second as GB/s and as a fraction of the device-copy bandwidth
//! measured in the same run (`bench kernels`' ceiling); the KV cache bytes a step reads, on average over the steps.

use super::kernels::ceilings;
use super::stats::{percentile, summarize};
use super::step::{dtype_name, gib, gpu_name, peak_bytes, round};
use super::subject::{Subject, SubjectArgs};
use crate::adapter_args::AdapterArgs;
use crate::device;
use crate::finetune::attach_adapters;
use crate::generate::place;
use anyhow::{bail, ensure, Result};
use qlora_autograd::Param;
use qlora_models::config::LayerKind;
use qlora_models::generate::{LogitsFor, Sampler, Sampling};
use qlora_models::kv_cache::KvCache;
use qlora_models::synthetic;
use qlora_models::transformer::CausalLm;
use qlora_models::ModelConfig;
use qlora_runtime::timing::Mark;
use qlora_runtime::{DType, Device, Rng};
use serde_json::{json, Value};
use std::time::Instant;

/// Defaults are the issue's measurement: one sequence, a 512-token prompt, 128 new tokens.
#[derive(clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    subject: SubjectArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens of each sequence's prompt (random ids), run as one prefill.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// New tokens per sequence: the first from the prefill's logits, each of the others from one decode step.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Untimed generations before the timed one (kernel compilation, allocator warm-up).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// The base alone, without adapters.
    #[arg(long, conflicts_with = "merge")]
    no_adapter: bool,
    /// On a GPU, fold the adapters into dense weights first, as `generate --merge` does (on the CPU they always
    /// are).
    #[arg(long)]
    merge: bool,
    /// Copies timed for the device-copy bandwidth (the median is reported).
    #[arg(long, default_value_t = 20)]
    copy_reps: usize,
    /// Seed for the weights, adapters and prompts.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
}

impl DecodeArgs {
    fn check(&self, config: &ModelConfig) -> Result<()> {
        ensure!(self.batch >= 1, "--batch must be at least 1");
        ensure!(self.prompt >= 1, "--prompt must be at least 1 token");
        ensure!(self.tokens >= 2, "--tokens must be at least 2 (the first comes from the prefill, not a decode step)");
        ensure!(self.copy_reps >= 1, "--copy-reps must be at least 1");
        // The last new token is chosen, never run: it takes no position.
        let positions = self.prompt + self.tokens - 1;
        ensure!(
            positions <= config.max_position_embeddings,
            "--prompt {} and --tokens {} need {positions} positions; the model's context (max_position_embeddings) is {}",
            self.prompt,
            self.tokens,
            config.max_position_embeddings
        );
        self.adapter.check()
    }
}

/// One generation's times: [`Step`] 0 is the prefill, the others decode steps.
struct Step {
    wall_ms: f64,
    device: (Mark, Mark),
}

pub fn run(args: &DecodeArgs) -> Result<()> {
    // Usage mistakes first, in one line, before a device is opened (which may print a note).
    let targets = args.adapter.targets()?;
    let Some(subject) = args.subject.subject()? else {
        bail!("bench decode needs --shape NAME ({}) or --model DIR", synthetic::shape_names())
    };
    let config = subject.config()?;
    args.check(&config)?;
    let placement = device::pick(args.subject.device, args.subject.dtype.dtype(), "benchmarking")?;
    let (device, dtype) = placement;

    let started = Instant::now();
    let dense = if device == Device::Cpu { DType::F32 } else { dtype };
    let mut model = subject.model(&config, (args.adapter.base_format(), dense), args.seed, None)?;
    if !args.no_adapter {
        attach_adapters(&mut model, &targets, &args.adapter.lora_config(), args.seed)?;
    }
    let model = place(model, placement, args.merge)?;
    let build_s = started.elapsed().as_secs_f64();

    let mut rng = Rng::new(args.seed ^ 0xDEC0);
    for _ in 0..args.warmup {
        generation(&model, args, &mut rng, device)?;
    }
    let steps = generation(&model, args, &mut rng, device)?;
    // Read before the copy's buffers count in it.
    let peak = peak_bytes(device)?;
    let copy_gbps = match device {
        Device::Cuda(ordinal) => Some(ceilings::copy_gbps(&qlora_runtime::cuda_device(ordinal)?, 2, args.copy_reps)?),
        Device::Cpu => None,
    };

    let (prefill, decode) = steps.split_first().expect("--tokens ≥ 2 steps, checked");
    let wall: Vec<f64> = decode.iter().map(|s| s.wall_ms).collect();
    let device_ms = decode.iter().map(|s| s.device.0.elapsed_ms(&s.device.1)).collect::<Result<Vec<f64>, _>>()?;
    let decode_ms = summarize(&wall).median;
    let weights = weight_bytes(&model, args.batch);
    let weight_gbps = weights as f64 / decode_ms / 1e6;
    // The cache holds the activations' dtype: the placement's on a GPU, f32 on the CPU.
    let kv = kv_bytes_per_step(&config, args, dtype.size_in_bytes());
    let report = json!({
        "subject": subject.to_string(),
        "device": device.to_string(),
        "gpu": gpu_name(device),
        "dtype": dtype_name(dtype),
        "batch": args.batch,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "warmup": args.warmup,
        "quantize": args.adapter.quantize,
        "double_quant": args.adapter.double_quant(),
        "adapter": !args.no_adapter,
        "r": (!args.no_adapter).then_some(args.adapter.r),
        "target_modules": (!args.no_adapter).then_some(&targets),
        "dora": !args.no_adapter && args.adapter.dora,
        "merged": !args.no_adapter && (args.merge || device == Device::Cpu),
        "build_s": round(build_s, 2),
        "prefill_ms": round(prefill.wall_ms, 3),
        "prefill_tokens_per_s": round((args.batch * args.prompt) as f64 / prefill.wall_ms * 1e3, 1),
        "decode_steps": decode.len(),
        "decode_ms": round(decode_ms, 3),
        "decode_ms_p90": round(percentile(&wall, 0.9), 3),
        "decode_device_ms": round(summarize(&device_ms).median, 3),
        "decode_tokens_per_s": round(args.batch as f64 / decode_ms * 1e3, 1),
        "weight_bytes": weights,
        "weight_gbps": round(weight_gbps, 1),
        "copy_gbps": copy_gbps.map(|g| round(g, 1)),
        "weight_of_copy": copy_gbps.map(|g| round(weight_gbps / g, 3)),
        "kv_bytes_per_step": kv,
        "peak_gib": peak.map(gib),
    });
    if args.json {
        println!("{report}");
    } else {
        print_report(&subject, &config, args, placement, &report);
    }
    Ok(())
}

/// Prefill then `--tokens` − 1 greedy decode steps over fresh random prompts, each step timed.
fn generation(model: &CausalLm, args: &DecodeArgs, rng: &mut Rng, device: Device) -> Result<Vec<Step>> {
    let vocab = model.config.vocab_size as u64;
    let mut input: Vec<Vec<u32>> =
        (0..args.batch).map(|_| (0..args.prompt).map(|_| rng.below(vocab) as u32).collect()).collect();
    let mut cache = KvCache::new(&model.config, args.batch);
    let mut sampler = Sampler::new(Sampling::Greedy)?;
    let mut steps = Vec::with_capacity(args.tokens);
    for _ in 0..args.tokens {
        let started = Instant::now();
        let new: Vec<&[u32]> = input.iter().map(Vec::as_slice).collect();
        let before = Mark::now(device)?;
        let logits = model.forward_cached(&mut cache, &new, LogitsFor::Last)?;
        let after = Mark::now(device)?;
        let logits = logits.to_device(Device::Cpu)?;
        let width = logits.shape()[1];
        input = logits.values::<f32>().chunks(width).map(|row| vec![sampler.sample(row)]).collect();
        steps.push(Step { wall_ms: started.elapsed().as_secs_f64() * 1e3, device: (before, after) });
    }
    Ok(steps)
}

/// Bytes of weights one decode step reads, as the model holds them: every projection's base (NF4: packed nibbles
/// and scales), bias and adapter, every norm, the lm_head (the embedding table when tied) whole, and one embedding
/// row per sequence.
fn weight_bytes(model: &CausalLm, batch: usize) -> usize {
    let param = |p: &Param| p.value().size_in_bytes();
    let projections: usize = model
        .projections()
        .iter()
        .map(|p| {
            let adapter = p
                .adapter
                .as_ref()
                .map_or(0, |a| param(&a.lora_a) + param(&a.lora_b) + a.magnitude.as_ref().map_or(0, param));
            p.base.size_in_bytes() + p.bias.as_ref().map_or(0, param) + adapter
        })
        .sum();
    let norms: usize = model
        .layers
        .iter()
        .flat_map(|l| {
            [
                Some(&l.input_layernorm),
                Some(&l.post_attention_layernorm),
                l.pre_feedforward_layernorm.as_ref(),
                l.post_feedforward_layernorm.as_ref(),
                l.self_attn.q_norm.as_ref(),
                l.self_attn.k_norm.as_ref(),
            ]
        })
        .flatten()
        .map(param)
        .sum();
    let table = model.embed_tokens.value();
    let head = model.lm_head.as_ref().map_or(table.size_in_bytes(), param);
    let rows = batch * table.size_in_bytes() / table.shape()[0].max(1);
    projections + norms + param(&model.norm) + head + rows
}

/// Bytes of cached keys and values the decode steps' attention reads, on average per step: every layer's keys and
/// values of every sequence up to the step's token (a sliding-window layer only its window's).
fn kv_bytes_per_step(config: &ModelConfig, args: &DecodeArgs, elem_bytes: usize) -> usize {
    let row = 2 * config.num_key_value_heads * config.head_dim * elem_bytes;
    let window = config.sliding_window.unwrap_or(usize::MAX);
    let steps = args.tokens - 1;
    let total: usize = (1..=steps)
        .map(|i| {
            let keys = args.prompt + i;
            let per_layer = |kind: &LayerKind| if *kind == LayerKind::Sliding { keys.min(window) } else { keys };
            config.layer_kinds.iter().map(per_layer).sum::<usize>()
        })
        .sum();
    args.batch * row * total / steps
}

fn print_report(subject: &Subject, c: &ModelConfig, args: &DecodeArgs, placement: (Device, DType), r: &Value) {
    let adapter = if args.no_adapter {
        "no adapter".to_string()
    } else {
        let how = if r["merged"] == true { "merged" } else { "unmerged" };
        format!("{} {}, {how}", args.adapter.method(), args.adapter.adapter_name())
    };
    println!(
        "bench decode {subject}: {} layers, hidden {}, vocab {} ({}; {adapter}) on {}",
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        args.adapter.base_name(),
        device::describe(placement),
    );
    println!(
        "batch {}, prompt {} tokens, {} new tokens (greedy), after {} untimed generation(s)",
        args.batch, args.prompt, args.tokens, args.warmup
    );
    println!("prefill {} ms ({} tokens/s)", r["prefill_ms"], r["prefill_tokens_per_s"]);
    println!(
        "decode {} ms per step (median of {}; p90 {}, device {}): {} tokens/s",
        r["decode_ms"], r["decode_steps"], r["decode_ms_p90"], r["decode_device_ms"], r["decode_tokens_per_s"]
    );
    let of_copy = match (r["copy_gbps"].as_f64(), r["weight_of_copy"].as_f64()) {
        (Some(copy), Some(f)) => format!(", {:.0}% of the device-copy bandwidth ({copy:.0} GB/s)", 100.0 * f),
        _ => String::new(),
    };
    let mb = |v: &Value| v.as_f64().unwrap_or(0.0) / 1e6;
    println!(
        "reads per step: weights {:.1} MB at {} GB/s{of_copy}; KV cache {:.1} MB (mean)",
        mb(&r["weight_bytes"]),
        r["weight_gbps"],
        mb(&r["kv_bytes_per_step"]),
    );
}
