//! `qlora-rt bench --shape NAME | --model DIR`: whole QLoRA training steps, timed. The model is a built-in
//! architecture with random NF4 weights (`qlora_models::synthetic`) or a folder loaded as `finetune` loads it; the
//! adapters are attached as `finetune` attaches them; each step is `finetune`'s own
//! [`optimizer_step`](crate::finetune::step::optimizer_step) over random token ids, every token trained.
//!
//! Reported: the median step time over `--steps` after `--warmup` untimed steps, tokens/s, the device allocator's
//! peak, and the median time of each phase (forward, backward, optimizer with clipping), all measured on the device
//! (CUDA events on a GPU). `--profile` runs one more step with the profiling hook on and lists the regions that
//! took its time. A run whose estimated memory exceeds what the device has free reports the estimate and stops.

use super::memory::{self, Estimate, Setup};
use super::stats::{summarize, Summary};
use super::subject::{Subject, SubjectArgs};
use crate::adapter_args::AdapterArgs;
use crate::device;
use crate::finetune::attach_adapters;
use crate::finetune::parallel::{self, RankArgs, World};
use crate::finetune::spawn;
use crate::finetune::step::{optimizer_step, Phase, Phases, StepConfig};
use anyhow::{bail, ensure, Context, Result};
use qlora_models::synthetic;
use qlora_models::transformer::Batch;
use qlora_models::ModelConfig;
use qlora_optim::{AdamW, AdamWConfig};
use qlora_runtime::cuda::synchronizations;
use qlora_runtime::dist::Communicator;
use qlora_runtime::profile::{self, RegionTime};
use qlora_runtime::timing::Mark;
use qlora_runtime::Rng;
use qlora_runtime::{DType, Device};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;

/// Flags and defaults are finetune's where finetune has them (so a bench measures what a default run trains), and
/// the peer benchmarks' batch of 4 × 2048 tokens.
#[derive(clap::Args)]
pub struct StepArgs {
    #[command(flatten)]
    subject: SubjectArgs,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per sequence (random ids; every token trained).
    #[arg(long, default_value_t = 2048)]
    seq: usize,
    /// Instead of --seq: the longest sequence whose step fits by the memory estimate (under --memory-budget, else
    /// in the device's free memory), found by bisection, then run: the report's `seq` is it. The estimate is ±15 %:
    /// a run that does not fit says so, and a lower --memory-budget finds a shorter one.
    #[arg(long, conflicts_with = "seq")]
    longest: bool,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Timed optimizer steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed optimizer steps before them (kernel compilation, allocator warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Recompute each decoder layer in backward [default: on].
    #[arg(long, overrides_with = "no_gradient_checkpointing")]
    gradient_checkpointing: bool,
    /// Keep every activation.
    #[arg(long, overrides_with = "gradient_checkpointing")]
    no_gradient_checkpointing: bool,
    /// GiB the step may hold, auto (free device memory less 10 %, at least 1 GiB) or lean (the least memory): under
    /// checkpointing, the last layers that fit keep their activations instead of being recomputed, and when even
    /// recomputing all does not fit, the inputs of as few of the first ones as needed wait in pinned host memory,
    /// then AdamW's moments too (a GPU only; the plan is printed).
    #[arg(long, value_name = "GiB|auto|lean")]
    memory_budget: Option<memory::Budget>,
    /// Of the layers the plan recomputes, this many keep their activations in pinned host memory instead (a GPU
    /// only): no recompute, the activations copied out and back over the host link under the other layers' compute.
    /// Instead of the plan's choice (by default as many as the link carries), to compare counts; 0 parks none.
    #[arg(long, value_name = "N")]
    park_layers: Option<usize>,
    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Seed for the weights, adapters, tokens and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object instead of the report.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    ranks: RankArgs,
    /// Run one more step with the profiling hook on and list the regions that took its device time.
    #[arg(long)]
    profile: bool,
}

impl StepArgs {
    fn check(&self) -> Result<()> {
        ensure!(self.batch >= 1, "--batch must be at least 1");
        ensure!(self.seq >= 2, "--seq must be at least 2 (one token predicts the next)");
        ensure!(self.grad_accum >= 1, "--grad-accum must be at least 1");
        ensure!(self.steps >= 1, "--steps must be at least 1");
        ensure!(
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            "--max-grad-norm must be 0 (off) or a positive number, got {}",
            self.max_grad_norm
        );
        self.adapter.check()
    }

    fn checkpointing(&self) -> bool {
        self.gradient_checkpointing || !self.no_gradient_checkpointing
    }
}

/// Device milliseconds of one step, by phase.
#[derive(Clone, Copy, Debug, Default)]
struct StepTimes {
    total: f64,
    /// Indexed by [`Phase`] as declared.
    phases: [f64; 3],
}

fn phase_index(p: Phase) -> usize {
    match p {
        Phase::Forward => 0,
        Phase::Backward => 1,
        Phase::Optimizer => 2,
    }
}

/// Marks each phase boundary of a step on the device; read after the step.
struct PhaseTimer {
    device: Device,
    marks: Vec<(Option<Phase>, Mark)>,
}

impl Phases for PhaseTimer {
    fn enter(&mut self, phase: Phase) -> Result<()> {
        self.marks.push((Some(phase), Mark::now(self.device)?));
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.marks.push((None, Mark::now(self.device)?));
        Ok(())
    }
}

impl PhaseTimer {
    fn times(&self) -> Result<StepTimes> {
        let mut t = StepTimes::default();
        for pair in self.marks.windows(2) {
            if let Some(phase) = pair[0].0 {
                t.phases[phase_index(phase)] += pair[0].1.elapsed_ms(&pair[1].1)?;
            }
        }
        if let (Some(first), Some(last)) = (self.marks.first(), self.marks.last()) {
            t.total = first.1.elapsed_ms(&last.1)?;
        }
        Ok(t)
    }
}

/// `grad_accum` micro-batches per rank (of `ranks`) of `batch` random sequences of `seq` tokens, every next token
/// trained.
fn random_batches(rng: &mut Rng, (args, seq): (&StepArgs, usize), vocab: usize, ranks: usize) -> Result<Vec<Batch>> {
    (0..args.grad_accum * ranks)
        .map(|_| {
            let seqs: Vec<(Vec<i32>, Vec<i32>)> = (0..args.batch)
                .map(|_| {
                    let ids: Vec<i32> = (0..seq).map(|_| rng.below(vocab as u64) as i32).collect();
                    (ids.clone(), ids)
                })
                .collect();
            Ok(Batch::pack(&seqs)?)
        })
        .collect()
}

/// What to lower when a step does not fit.
const SHRINK: &str = "lower --batch or --seq";

pub fn run(args: &StepArgs) -> Result<()> {
    args.check()?;
    // Usage mistakes first, in one line, before a device is opened (which may print a note).
    let targets = args.adapter.targets()?;
    let Some(subject) = args.subject.subject()? else {
        bail!(
            "bench needs --shape NAME ({}) or --model DIR; `bench kernels` times the CUDA kernels",
            synthetic::shape_names()
        )
    };
    let config = subject.config()?;
    let world = args.ranks.world(args.subject.device, args.adapter.base_format(), "bench")?;
    if let World::Spawn(n) = world {
        return spawn::gpus(n).map(drop);
    }
    let placement = parallel::placement(&world, args.subject.dtype.dtype(), "benchmarking")?;
    parallel::run_as(&world, |group| bench(args, (&subject, &config, &targets), placement, group))
}

/// One process's (or in-process rank's) benchmark, as the only one or as one rank of `group` (rank 0 reports).
fn bench(
    args: &StepArgs,
    (subject, config, targets): (&Subject, &ModelConfig, &[&str]),
    placement: (Device, DType),
    group: Option<Arc<dyn Communicator>>,
) -> Result<()> {
    let (device, dtype) = placement;
    let lead = group.as_ref().is_none_or(|g| g.rank() == 0);
    let ranks = group.as_ref().map_or(1, |g| g.world_size());
    let format = args.adapter.base_format();
    let shard = group.clone().filter(|_| args.ranks.shard_base);
    let setup = Setup {
        config,
        format,
        device,
        compute: dtype,
        tokens: args.batch * args.seq,
        r: args.adapter.r,
        dora: args.adapter.dora,
        targets,
        checkpointing: args.checkpointing(),
        shards: if shard.is_some() { ranks } else { 1 },
        // --grad-accum micro-batches per GPU.
        ranks: (ranks, args.grad_accum),
        plan: memory::Plan::default(),
    };
    // Every rank plans within the least free memory of any (so all take the same length, plan and fit verdict).
    let free = memory::Free::agreed(device, group.as_deref())?;
    let seq = if args.longest {
        // Offloaded inputs and paged moments wait in host memory, which bounds them too.
        memory::longest_seq(&setup, args.batch, args.memory_budget, free)?
    } else {
        args.seq
    };
    let setup = Setup { tokens: args.batch * seq, ..setup };
    if seq > config.max_position_embeddings && lead {
        // A benchmark measures time and memory, which do not depend on what the positions mean: longer sequences
        // (the context-length limits of a GPU, issue #13) run with a note instead of an error.
        eprintln!(
            "qlora-rt: note: --seq {seq} is past the model's context ({}); positions beyond it were never trained",
            config.max_position_embeddings
        );
    }
    let (plan, estimate) = memory::budget_plan(&setup, free, args.memory_budget, args.park_layers, SHRINK)?;
    let offloaded = memory::offloaded_layers(&Setup { plan, ..setup });
    let parked = memory::parked_layers(&Setup { plan, ..setup });
    let available = free.device;
    let mut report = json!({
        "subject": subject.to_string(),
        "device": device.to_string(),
        "gpu": gpu_name(device),
        "dtype": dtype_name(dtype),
        "batch": args.batch,
        "seq": seq,
        "longest": args.longest,
        "grad_accum": args.grad_accum,
        "r": args.adapter.r,
        "alpha": args.adapter.alpha,
        "dropout": args.adapter.dropout,
        "target_modules": targets,
        "rslora": args.adapter.rslora,
        "dora": args.adapter.dora,
        "quantize": args.adapter.quantize,
        "double_quant": args.adapter.double_quant(),
        "gradient_checkpointing": args.checkpointing(),
        "ranks": ranks,
        "backend": group.as_ref().map(|g| g.backend()),
        "shard_base": shard.is_some(),
        "keep_layers": plan.keep_layers,
        "offload": offloaded > 0,
        "offload_layers": offloaded,
        "park_layers": parked,
        "page_optimizer": plan.page_optimizer,
        "mlp_block": plan.mlp_block,
        "offload_host_gib": gib(estimate.host),
        "max_grad_norm": args.max_grad_norm,
        "linear_params": memory::linear_params(config),
        "estimate_gib": gib(estimate.total()),
        "available_gib": available.map(gib),
    });
    // Every rank of a group has the same estimate and the same (least) free memory, so all stop here together or
    // none does.
    if let Some(free) = available.filter(|&free| estimate.total() > free) {
        report["fits"] = json!(false);
        return if lead { print_no_fit(subject, args.json, &report, &estimate, free, device) } else { Ok(()) };
    }
    report["fits"] = json!(true);

    let started = Instant::now();
    let dense = if device == Device::Cpu { DType::F32 } else { dtype };
    let mut model = subject.model(config, (format, dense), args.seed, shard.map(|g| (g, device)))?;
    model.gradient_checkpointing = args.checkpointing();
    let plan_line = (args.memory_budget.is_some() || parked > 0)
        .then(|| memory::describe_plan(plan, config.num_hidden_layers, &estimate));
    if let Some(line) = plan_line.as_ref().filter(|_| !args.json && lead) {
        println!("{line}");
    }
    attach_adapters(&mut model, targets, &args.adapter.lora_config(), args.seed)?;
    if device != Device::Cpu {
        model = model.to_device(device, dtype).with_context(|| format!("moving the model to {device}"))?;
    }
    let adamw = AdamWConfig::default();
    let mut optimizer = AdamW::new(model.trainable_params(), adamw)?;
    plan.apply(&mut model, &mut optimizer)?;
    let trainable: usize = model.trainable_params().iter().map(|p| p.value().elem_count()).sum();
    report["trainable_params"] = json!(trainable);
    report["build_s"] = json!(round(started.elapsed().as_secs_f64(), 2));

    let step_config = StepConfig { device, seed: args.seed, max_grad_norm: args.max_grad_norm, lr: adamw.lr };
    // Every rank draws the same micro-batches and trains its share of them.
    let mut rng = Rng::new(args.seed ^ 0xBE7C);
    let mut run_step = |batches: &[Batch], step: u64, phases: &mut dyn Phases| match &group {
        None => optimizer_step(&model, &mut optimizer, batches, step, &step_config, phases),
        Some(g) => Ok(parallel::optimizer_step(&model, &mut optimizer, &**g, batches, step, &step_config, phases)?.0),
    };
    let mut timed = Vec::with_capacity(args.steps);
    let (mut loss, mut syncs) = (f64::NAN, 0);
    for step in 0..args.warmup + args.steps {
        let batches = random_batches(&mut rng, (args, seq), config.vocab_size, ranks)?;
        let mut timer = PhaseTimer { device, marks: Vec::new() };
        let before = synchronizations(device)?;
        let outcome = run_step(&batches, step as u64, &mut timer)
            .map_err(|e| memory::out_of_memory_advice(e, args.memory_budget, plan_line.as_deref(), SHRINK))?;
        // Counted before the timer reads its events: what the step itself waited for.
        let waits = synchronizations(device)? - before;
        loss = outcome.loss;
        if step >= args.warmup {
            timed.push(timer.times()?);
            syncs += waits;
        }
    }
    let profile = if args.profile {
        let batches = random_batches(&mut rng, (args, seq), config.vocab_size, ranks)?;
        let step = (args.warmup + args.steps) as u64;
        profile::start(device);
        let before = Mark::now(device);
        let outcome = run_step(&batches, step, &mut ());
        let after = Mark::now(device);
        let rows = profile::stop();
        outcome?;
        let total = before?.elapsed_ms(&after?)?;
        Some((total, rows?))
    } else {
        None
    };

    let step_ms = summarize(&timed.iter().map(|t| t.total).collect::<Vec<_>>());
    let phase = |i: usize| summarize(&timed.iter().map(|t| t.phases[i]).collect::<Vec<_>>()).median;
    let tokens = args.batch * seq * args.grad_accum * ranks;
    let tokens_per_s = tokens as f64 / (step_ms.median / 1e3);
    // 4N per token, plus 2N more for the layers recomputed in backward.
    let layers = config.num_hidden_layers.max(1);
    let recomputed = if args.checkpointing() { layers.saturating_sub(plan.keep_layers + parked) } else { 0 };
    let flops_n = 4.0 + 2.0 * recomputed as f64 / layers as f64;
    let flops_per_token = flops_n * memory::linear_params(config) as f64;
    report["flops_per_token_n"] = json!(flops_n);
    report["steps"] = json!(args.steps);
    report["warmup"] = json!(args.warmup);
    report["tokens_per_step"] = json!(tokens);
    report["step_ms"] = json!(round(step_ms.median, 2));
    report["step_ms_min"] = json!(round(step_ms.min, 2));
    report["step_ms_max"] = json!(round(step_ms.max, 2));
    report["tokens_per_s"] = json!(round(tokens_per_s, 1));
    report["forward_ms"] = json!(round(phase(0), 2));
    report["backward_ms"] = json!(round(phase(1), 2));
    report["optimizer_ms"] = json!(round(phase(2), 2));
    // Parked buffers read before their restore, over the whole run (each costs a wait on a copy back, never a wrong
    // value): 0 when the plan parks what it should.
    report["park_faults"] = json!(qlora_runtime::park::faults());
    report["model_tflops"] = json!(round(tokens_per_s * flops_per_token / 1e12, 2));
    let peak = peak_bytes(device)?;
    report["peak_gib"] = json!(peak.map(gib));
    if let Some(g) = &group {
        // Each rank's peak: the GPUs of a sharded run hold different shares at different moments.
        let all = g.all_gather_bytes(&(peak.unwrap_or(0) as u64).to_le_bytes())?;
        let peaks: Vec<f64> =
            all.chunks(8).map(|b| gib(u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)).collect();
        report["peak_gib_per_rank"] = json!(peak.map(|_| peaks));
    }
    report["pinned_gib"] = json!(pinned_bytes(device)?.map(gib));
    report["peak_by_category_gib"] = json!(memory::peak_split_gib(device)?);
    report["loss"] = json!(round(loss, 4));
    if let Some(s) = &model.sharded {
        // Over the whole run: how many layer gathers found their layer already on its way.
        let c = s.counts();
        report["gathers"] = json!({"prefetched": c.prefetched, "on_demand": c.on_demand});
    }
    report["syncs_per_step"] = json!(syncs as f64 / args.steps.max(1) as f64);
    if let Some((total, rows)) = &profile {
        report["profile_step_ms"] = json!(round(*total, 2));
        report["profile"] = Value::Array(
            rows.iter()
                .map(|r| json!({"role": r.role.as_str(), "name": r.name, "calls": r.calls, "ms": round(r.ms, 3)}))
                .collect(),
        );
    }
    if !lead {
        return Ok(());
    }
    if args.json {
        println!("{report}");
    } else {
        print_report(args, subject, config, placement, &report, step_ms, profile.as_ref())?;
    }
    Ok(())
}

fn print_no_fit(
    subject: &Subject,
    json: bool,
    report: &Value,
    e: &Estimate,
    free: usize,
    device: Device,
) -> Result<()> {
    if json {
        println!("{report}");
    } else {
        println!(
            "{}: needs about {:.1} GiB on {device} (weights {:.1}, adapters and optimizer {:.1}, activations {:.1}), \
             {:.1} GiB free: not run",
            subject,
            gib(e.total()),
            gib(e.weights),
            gib(e.adapters),
            gib(e.activations),
            gib(free)
        );
    }
    Ok(())
}

fn print_report(
    args: &StepArgs,
    subject: &Subject,
    c: &ModelConfig,
    placement: (Device, DType),
    r: &Value,
    step: Summary,
    profile: Option<&(f64, Vec<RegionTime>)>,
) -> Result<()> {
    println!(
        "bench {}: {} layers, hidden {}, vocab {}, {:.2}B linear parameters ({}); {} trainable ({}); \
         on {}{}",
        subject,
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        memory::linear_params(c) as f64 / 1e9,
        args.adapter.base_name(),
        r["trainable_params"],
        args.adapter.adapter_name(),
        device::describe(placement),
        match (r["ranks"].as_u64(), r["backend"].as_str()) {
            (Some(n), Some(backend)) =>
                format!(", {n} {backend} ranks{}", if r["shard_base"] == true { ", the base sharded" } else { "" }),
            _ => String::new(),
        },
    );
    println!(
        "{} micro-batch(es) of {} × {} tokens{}, checkpointing {}, dropout {}; {} timed steps after {} warm-up",
        args.grad_accum,
        args.batch,
        r["seq"],
        if r["ranks"].as_u64().unwrap_or(1) > 1 { " per rank" } else { "" },
        if args.checkpointing() { "on" } else { "off" },
        args.adapter.dropout,
        args.steps,
        args.warmup,
    );
    println!(
        "step {:.1} ms (median; min {:.1}, max {:.1})   {} tokens/s   {} model TFLOP/s ({}N per token)",
        step.median, step.min, step.max, r["tokens_per_s"], r["model_tflops"], r["flops_per_token_n"],
    );
    println!(
        "phases: forward {} ms, backward {} ms, optimizer {} ms (medians); {} host wait(s) per step",
        r["forward_ms"], r["backward_ms"], r["optimizer_ms"], r["syncs_per_step"]
    );
    let peak = match (r["peak_gib"].as_f64(), r["peak_gib_per_rank"].as_array()) {
        (Some(_), Some(each)) => {
            let each: Vec<String> = each.iter().map(|g| format!("{:.2}", g.as_f64().unwrap_or(0.0))).collect();
            format!("{} GiB (per rank)", each.join(" / "))
        }
        (Some(g), None) => format!("{g:.2} GiB"),
        (None, _) => "n/a on the CPU".to_string(),
    };
    let pinned = match r["pinned_gib"].as_f64() {
        Some(g) if g > 0.0 => format!(", {g:.2} GiB pinned host memory for offloaded layer inputs"),
        _ => String::new(),
    };
    println!(
        "peak device memory {peak} (estimated {:.1} GiB){pinned}; loss {}",
        r["estimate_gib"].as_f64().unwrap_or(0.0),
        r["loss"]
    );
    if let Some(split) = memory::describe_peak(placement.0)? {
        println!("device memory {split}");
    }
    if let Some((total, rows)) = profile {
        let attributed: f64 = rows.iter().map(|r| r.ms).sum();
        println!("profile of one more step ({total:.1} ms), exclusive device time per region:");
        println!("{:>10} {:>6} {:>6}  region", "ms", "share", "calls");
        for row in rows.iter().take(20) {
            let share = 100.0 * row.ms / total.max(1e-9);
            println!("{:>10.2} {share:>5.1}% {:>6}  {} {}", row.ms, row.calls, row.role.as_str(), row.name);
        }
        if rows.len() > 20 {
            println!("{:>10} {:>6} {:>6}  ({} more regions)", "", "", "", rows.len() - 20);
        }
        let rest = (total - attributed).max(0.0);
        println!(
            "{rest:>10.2} {:>5.1}%         outside any region (embedding, final norm, clipping, AdamW, host gaps)",
            100.0 * rest / total.max(1e-9)
        );
    }
    Ok(())
}

/// GiB to the KiB (6 decimals), so that a small model's parts read as nonzero in the JSON; the text rounds further.
pub(super) fn gib(bytes: usize) -> f64 {
    round(bytes as f64 / (1u64 << 30) as f64, 6)
}

pub(super) fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

pub(super) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

pub(super) fn gpu_name(device: Device) -> Option<String> {
    let Device::Cuda(ordinal) = device else { return None };
    qlora_runtime::cuda_device(ordinal).ok().map(|d| d.name().to_string())
}

/// Pinned host memory the device's offloaded buffers took (held and cached), None on the CPU.
fn pinned_bytes(device: Device) -> Result<Option<usize>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(ordinal) => Ok(Some(qlora_runtime::cuda_device(ordinal)?.pinned_stats().reserved)),
    }
}

/// The device allocator's peak since the device was opened (model upload included), None on the CPU.
pub(super) fn peak_bytes(device: Device) -> Result<Option<usize>> {
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda(ordinal) => Ok(Some(qlora_runtime::cuda_device(ordinal)?.memory_stats().peak)),
    }
}
