//! `qlora-rt finetune`: QLoRA fine-tuning of a Hugging Face model folder on a dataset file, written as a PEFT
//! adapter. This file owns the flags and the order of things (settings → data → model → optimizer → loop →
//! outputs); the pieces are [`config`] (TOML files as flags), [`data`] (records → packed rows → micro-batches),
//! [`train`] (the step loop), [`step`] (one optimizer step, shared with `bench`), [`parallel`] (data-parallel
//! ranks), [`spawn`] (`--gpus N`: one process per GPU), [`checkpoint`] (resumable state on disk), [`metrics`]
//! (JSONL log, TensorBoard events) and [`plot`] (loss.png).
//!
//! Defaults follow the QLoRA paper (Dettmers et al. 2023, §4 and appendix B): NF4 with double quantization,
//! blocks of 64, LoRA on every linear layer, dropout 0.05, lr 2e-4, AdamW β = (0.9, 0.999), warmup ratio 0.03;
//! r = α = 16 and cosine decay are the usual choices of the Hugging Face recipes that reproduce it.

mod checkpoint;
mod config;
mod data;
mod metrics;
pub(crate) mod parallel;
mod plot;
pub(crate) mod spawn;
pub(crate) mod step;
mod train;

pub use config::expand_config;

use crate::adapter_args::AdapterArgs;
use crate::device::DeviceArg;
use crate::eval::DtypeArg;
use anyhow::{ensure, Context, Result};
use parallel::World;
use qlora_autograd::{LoraAdapter, LoraConfig};
use qlora_models::config::PROJECTIONS;
use qlora_models::data::template::BuiltinTemplate;
use qlora_models::data::tokenize::Formatter;
use qlora_models::formats::fsutil::write_atomic;
use qlora_models::formats::peft::{load_adapter, save_adapter};
use qlora_models::formats::tokenizer::Tokenizer;
use qlora_models::transformer::{CausalLm, Projection};
use qlora_optim::{AdamW, AdamWConfig, Schedule, ScheduleKind};
use qlora_runtime::dist::Communicator;
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::Rng;
use qlora_runtime::{DType, Device};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateArg {
    Llama3,
    Llama2,
    Gemma,
    Chatml,
}

impl TemplateArg {
    pub fn builtin(self) -> BuiltinTemplate {
        match self {
            TemplateArg::Llama3 => BuiltinTemplate::Llama3,
            TemplateArg::Llama2 => BuiltinTemplate::Llama2,
            TemplateArg::Gemma => BuiltinTemplate::Gemma,
            TemplateArg::Chatml => BuiltinTemplate::ChatMl,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleArg {
    Constant,
    Linear,
    Cosine,
}

/// Experiment trackers `--report-to` writes to besides metrics.jsonl.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportTo {
    None,
    /// TensorBoard event files in --out (`tensorboard --logdir OUT`).
    Tensorboard,
}

/// Every flag can also come from `--config FILE.toml` (see `config`); pairs that replace each other
/// (`--epochs`/`--max-steps`, ...) override each other, so the one given last wins.
#[derive(clap::Args, Clone, Debug)]
#[command(args_override_self = true)]
pub struct FinetuneArgs {
    /// Hugging Face model folder: config.json, safetensors weights and tokenizer.json (Llama, Gemma 1/2/3); or
    /// a .gguf file, imported once into the qlora-rt cache.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// Training data: JSONL, a JSON array or Parquet, of chat ("messages", or ShareGPT "conversations"),
    /// prompt/completion, instruction/output (Alpaca), text or input_ids rows.
    #[arg(long, value_name = "FILE")]
    data: PathBuf,
    /// Output folder: the adapter, tokenizer files, metrics.jsonl, loss.png and checkpoint-STEP folders.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Held-out file for the evaluation loss (same formats as --data).
    #[arg(long, value_name = "FILE", overrides_with = "eval_split")]
    eval_file: Option<PathBuf>,
    /// Instead of --eval-file: hold out this fraction of --data's examples (chosen with --seed).
    #[arg(long, value_name = "FRACTION", overrides_with = "eval_file")]
    eval_split: Option<f64>,
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    lr: f64,
    /// Learning-rate decay after warmup.
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    schedule: ScheduleArg,
    /// Warmup as a fraction of the optimizer steps (rounded up).
    #[arg(long, default_value_t = 0.03, overrides_with = "warmup_steps")]
    warmup_ratio: f64,
    /// Warmup in optimizer steps, instead of --warmup-ratio.
    #[arg(long, overrides_with = "warmup_ratio")]
    warmup_steps: Option<u64>,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1, overrides_with = "max_steps")]
    epochs: u64,
    /// Optimizer steps to train, instead of --epochs (the data is reshuffled and repeated as needed).
    #[arg(long, overrides_with = "epochs")]
    max_steps: Option<u64>,
    /// Tokens per packed row; longer examples are truncated (capped at the model's context length).
    #[arg(long, default_value_t = 1024)]
    max_seq_len: usize,
    /// Rows per micro-batch (one forward and backward).
    #[arg(long, default_value_t = 1, overrides_with = "batch_tokens")]
    micro_batch: usize,
    /// Instead of --micro-batch: fill each micro-batch with rows up to this many tokens (at least one row).
    #[arg(long, overrides_with = "micro_batch")]
    batch_tokens: Option<usize>,
    /// Micro-batches per optimizer step; the loss is averaged over every trained token of all of them.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Clip the global gradient norm to this (0 disables clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    beta1: f64,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    beta2: f64,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    eps: f64,
    /// Seed for adapter initialisation, the evaluation split, data order and dropout.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// One example per row instead of packing several into each row.
    #[arg(long)]
    no_packing: bool,
    /// Train on every token, prompts and user turns included (default: assistant turns and completions only).
    #[arg(long)]
    train_on_everything: bool,
    /// Chat template to use instead of the tokenizer's own.
    #[arg(long, value_enum)]
    chat_template: Option<TemplateArg>,
    /// Skip malformed rows (counted and reported) instead of stopping at the first.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Write OUT/checkpoint-STEP every N optimizer steps (0: never).
    #[arg(long, value_name = "N", default_value_t = 100)]
    save_every: u64,
    /// Keep only the K most recent checkpoints (0: keep all).
    #[arg(long, value_name = "K", default_value_t = 3)]
    keep_last: usize,
    /// Evaluate every N optimizer steps (0: only at the end); needs --eval-file or --eval-split.
    #[arg(long, value_name = "N", default_value_t = 100)]
    eval_every: u64,
    /// Also log loss, eval loss, learning rate, grad norm, tokens/s and memory to: none, or tensorboard (event
    /// files in --out, beside metrics.jsonl).
    #[arg(long, value_enum, value_name = "TRACKER", default_value_t = ReportTo::None)]
    report_to: ReportTo,
    /// Continue from the latest checkpoint in --out, or from the checkpoint folder given.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    resume: Option<Option<PathBuf>>,
    /// TOML file of flags (`lr = 1e-4`, `target-modules = ["q_proj", "v_proj"]`); command-line flags win.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where to train: auto (the first CUDA GPU when there is one, else CPU; a notice says which), cpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Compute precision on CUDA (activations and the dequantized base weights; adapters and optimizer moments
    /// stay f32). The CPU always computes in f32.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    dtype: DtypeArg,
    /// Recompute each decoder layer in backward instead of keeping its activations [default: on].
    #[arg(long, overrides_with = "no_gradient_checkpointing")]
    gradient_checkpointing: bool,
    /// Keep every activation (faster, more memory).
    #[arg(long, overrides_with = "gradient_checkpointing")]
    no_gradient_checkpointing: bool,
    /// GiB a training step may hold, auto (free device memory less 10 %, at least 1 GiB) or lean (the least
    /// memory): under checkpointing, the last layers that fit keep their activations instead of being recomputed
    /// (faster), and when even recomputing every layer does not fit, the inputs of as few of the first recomputed
    /// layers as needed (all with lean) wait in pinned host memory, copied back one layer ahead, then AdamW's moments
    /// too between updates (a GPU only); layers parked in host memory (`--park-layers`) count where they fit too;
    /// the results are the same bits. The plan is printed at the start; a budget
    /// too small for any plan is an error saying what to lower.
    #[arg(long, value_name = "GiB|auto|lean")]
    memory_budget: Option<crate::bench::memory::Budget>,
    /// Of the layers the plan recomputes, this many keep their activations in pinned host memory instead (a GPU
    /// only): no recompute, the activations copied out and back over the host link under the other layers' compute,
    /// for about one layer's activations more on the device; the results are the same bits. Instead of the plan's
    /// choice, which on a GPU parks as many as the link carries within half the host's free memory; 0 parks none.
    #[arg(long, value_name = "N")]
    park_layers: Option<usize>,
    #[command(flatten)]
    ranks: parallel::RankArgs,
}

impl FinetuneArgs {
    fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing || !self.no_gradient_checkpointing
    }

    fn check(&self) -> Result<()> {
        let unit = |name: &str, x: f64| -> Result<()> {
            ensure!((0.0..1.0).contains(&x), "--{name} must be in [0, 1), got {x}");
            Ok(())
        };
        self.adapter.check()?;
        ensure!(self.lr.is_finite() && self.lr > 0.0, "--lr must be a positive number, got {}", self.lr);
        unit("warmup-ratio", self.warmup_ratio)?;
        ensure!(self.epochs >= 1, "--epochs must be at least 1");
        ensure!(self.max_steps != Some(0), "--max-steps must be at least 1");
        ensure!(self.max_seq_len >= 2, "--max-seq-len must be at least 2 (one token predicts the next)");
        ensure!(self.micro_batch >= 1, "--micro-batch must be at least 1");
        ensure!(self.batch_tokens != Some(0), "--batch-tokens must be at least 1");
        ensure!(self.grad_accum >= 1, "--grad-accum must be at least 1");
        ensure!(
            self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0,
            "--max-grad-norm must be 0 (off) or a positive number, got {}",
            self.max_grad_norm
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "--weight-decay must be a non-negative number, got {}",
            self.weight_decay
        );
        unit("beta1", self.beta1)?;
        unit("beta2", self.beta2)?;
        ensure!(self.eps.is_finite() && self.eps > 0.0, "--eps must be a positive number, got {}", self.eps);
        if let Some(f) = self.eval_split {
            ensure!(f > 0.0 && f < 1.0, "--eval-split must be a fraction in (0, 1), got {f}");
        }
        Ok(())
    }

    /// Everything that shapes the loss trajectory, for the checkpoint's config check: a resumed run continues
    /// exactly only with the same values. Paths are left out (a moved folder is still the same run); the data
    /// is represented by a fingerprint of its packed rows instead.
    fn trajectory(&self, data_fingerprint: &str, targets: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "data": data_fingerprint,
            "quantize": self.adapter.quantize,
            "double_quant": self.adapter.double_quant(),
            "r": self.adapter.r,
            "alpha": self.adapter.alpha,
            "dropout": self.adapter.dropout,
            "target_modules": targets,
            "rslora": self.adapter.rslora,
            "dora": self.adapter.dora,
            "lr": self.lr,
            "schedule": self.schedule,
            "warmup_ratio": self.warmup_ratio,
            "warmup_steps": self.warmup_steps,
            "epochs": self.epochs,
            "max_steps": self.max_steps,
            "micro_batch": self.micro_batch,
            "batch_tokens": self.batch_tokens,
            "grad_accum": self.grad_accum,
            "max_grad_norm": self.max_grad_norm,
            "weight_decay": self.weight_decay,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "seed": self.seed,
        })
    }
}

/// Refuses to mix a new run into a folder that already holds one, unless --resume was given (which, with no
/// checkpoint to resume from, restarts a run that died before its first one).
fn check_out(out: &Path, resume_flag: bool) -> Result<()> {
    if resume_flag || !out.exists() {
        return Ok(());
    }
    let leftovers = ["metrics.jsonl", "adapter_model.safetensors"].iter().any(|f| out.join(f).exists())
        || !checkpoint::list(out)?.is_empty();
    ensure!(
        !leftovers,
        "--out {} already holds a training run; pass --resume to continue it, or choose another folder",
        out.display()
    );
    Ok(())
}

/// Tokenizer, generation and chat-template files a model folder carries, copied next to the adapter so the
/// output folder is self-contained for chat and generation.
fn copy_tokenizer_files(model: &Path, out: &Path) -> Result<()> {
    let entries = std::fs::read_dir(model).with_context(|| format!("reading {}", model.display()))?;
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", model.display()))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let wanted = name.starts_with("tokenizer")
            || name.starts_with("chat_template")
            || matches!(name, "special_tokens_map.json" | "generation_config.json" | "added_tokens.json");
        if wanted && path.is_file() {
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            write_atomic(&out.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// Attaches fresh adapters (A random from `seed`, B zero) to the targeted projections.
pub(crate) fn attach_adapters(model: &mut CausalLm, targets: &[&str], config: &LoraConfig, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let mut n = 0;
    let per_layer = PROJECTIONS.len();
    for i in 0..model.layers.len() {
        // DoRA's magnitudes start at the base's row norms: a sharded base gathers the layer to read them, and its
        // weights (on the GPU the shards live on) come to the host dense, where the adapters are drawn.
        let whole = if config.use_dora && model.sharded.is_some() {
            let layer = model.gathered_layer(i)?;
            let dense = |p: &Projection| -> Result<BaseWeight> {
                Ok(BaseWeight::Dense(p.base.materialize(DType::F32)?.to_device(Device::Cpu)?))
            };
            Some(layer.projections().map(dense).into_iter().collect::<Result<Vec<_>>>()?)
        } else {
            None
        };
        for (j, proj) in model.projections_mut()?.into_iter().skip(i * per_layer).take(per_layer).enumerate() {
            if targets.iter().any(|t| proj.name.ends_with(&format!(".{t}"))) {
                let base = whole.as_ref().map_or(&proj.base, |w| &w[j]);
                proj.adapter = Some(LoraAdapter::new(&proj.name, base, config, &mut rng)?);
                n += 1;
            }
        }
    }
    ensure!(n > 0, "--target-modules matched no projection of the model");
    Ok(())
}

/// Runs the command; an interrupted run (Ctrl-C, SIGTERM) exits with status 130 after its checkpoint is written.
pub fn run(args: &FinetuneArgs) -> Result<()> {
    // A .gguf or Hub --model trains on its imported folder or cached snapshot.
    let args = &FinetuneArgs { model: crate::model_path::resolve_model(&args.model)?, ..args.clone() };
    match run_to_end(args)? {
        train::Outcome::Finished => Ok(()),
        train::Outcome::Interrupted => std::process::exit(130),
    }
}

/// With --resume: the checkpoint to continue from (the latest in --out unless a folder is given).
fn resume_target(args: &FinetuneArgs) -> Result<Option<PathBuf>> {
    Ok(match &args.resume {
        None => None,
        Some(Some(dir)) => Some(dir.clone()),
        Some(None) => {
            let latest = checkpoint::list(&args.out)?.pop().map(|(_, dir)| dir);
            if latest.is_none() {
                println!("no checkpoint in {} to resume from; starting from the beginning", args.out.display());
            }
            latest
        }
    })
}

/// The training plan and evaluation rows, with rows capped at the model's context length.
fn load_data(args: &FinetuneArgs) -> Result<(data::Plan, Option<Vec<data::Row>>, usize)> {
    let context = qlora_models::ModelConfig::load(&args.model)?.max_position_embeddings;
    let max_seq_len = args.max_seq_len.min(context);
    if max_seq_len < args.max_seq_len {
        println!("--max-seq-len {} is longer than the model's context; using {context}", args.max_seq_len);
    }
    let tokenizer = Tokenizer::load(&args.model)?;
    let formatter = Formatter::new(&tokenizer, args.chat_template.map(TemplateArg::builtin), args.train_on_everything)
        .map_err(|e| anyhow::anyhow!("chat template of {}: {e}", args.model.display()))?;
    let sets = data::prepare(
        &data::Sources { train: &args.data, eval_file: args.eval_file.as_deref(), eval_split: args.eval_split },
        &formatter,
        &data::Shaping { max_seq_len, packing: !args.no_packing, skip_bad_lines: args.skip_bad_lines, seed: args.seed },
    )?;
    let grouping = match args.batch_tokens {
        Some(tokens) => data::Grouping::Tokens(tokens),
        None => data::Grouping::Rows(args.micro_batch),
    };
    Ok((data::Plan::new(sets.train, grouping, args.grad_accum, args.seed), sets.eval, max_seq_len))
}

/// The model with its adapters (fresh, or the checkpoint's) on `device` computing in `dtype`, an optimizer over
/// them (fresh, or restored), and where training starts.
fn load_model(
    args: &FinetuneArgs,
    targets: &[&str],
    resume_from: Option<&Path>,
    trajectory: &serde_json::Value,
    (device, dtype): (Device, DType),
    group: Option<&Arc<dyn Communicator>>,
) -> Result<(CausalLm, AdamW, checkpoint::TrainerState)> {
    let lead = group.is_none_or(|g| g.rank() == 0);
    // Dense in f32, the CPU compute precision: no per-step upcast of the frozen weights.
    let mut model = match group {
        Some(g) if args.ranks.shard_base => {
            // The shards go straight to the device; the rest of the model follows below.
            CausalLm::load_sharded(&args.model, args.adapter.base_format(), g.clone(), device)?
        }
        _ => CausalLm::load(&args.model, args.adapter.base_format())?,
    };
    model.gradient_checkpointing = args.gradient_checkpointing();
    let resumed = match resume_from {
        Some(dir) => {
            let saved = checkpoint::load(dir, trajectory)?;
            load_adapter(&mut model, dir).with_context(|| format!("resuming from {}", dir.display()))?;
            Some(saved)
        }
        None => {
            attach_adapters(&mut model, targets, &args.adapter.lora_config(), args.seed)?;
            None
        }
    };
    // Adapters are drawn (or read) on the host first, so a GPU run starts from exactly the CPU run's values.
    if device != Device::Cpu {
        model = model.to_device(device, dtype).with_context(|| format!("moving the model to {device}"))?;
    }
    let adamw = AdamWConfig {
        lr: args.lr,
        beta1: args.beta1,
        beta2: args.beta2,
        eps: args.eps,
        weight_decay: args.weight_decay,
    };
    let mut optimizer = AdamW::new(model.trainable_params(), adamw)?;
    let start = match resumed {
        Some((state, moments)) => {
            optimizer.load_state(&moments).context("restoring the optimizer state")?;
            if lead {
                println!("resuming at step {}", state.step);
            }
            state
        }
        None => checkpoint::TrainerState::fresh(args.seed, trajectory),
    };
    Ok((model, optimizer, start))
}

/// The run in two lines: model and adapters, then the schedule.
fn describe(args: &FinetuneArgs, model: &CausalLm, n_params: usize, schedule: &Schedule, rows: String, on: String) {
    let c = &model.config;
    println!(
        "model: {} layers, hidden {}, vocab {}; base {}; {n_params} trainable adapter parameters ({})",
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        args.adapter.base_name(),
        args.adapter.adapter_name(),
    );
    println!(
        "training: {} optimizer steps, warmup {}, {} micro-batch(es) of {rows} per step, on {on}",
        schedule.total_steps, schedule.warmup_steps, args.grad_accum,
    );
}

/// The loss plot's second title line: what was trained, how, on what.
fn plot_subtitle(args: &FinetuneArgs, schedule: &Schedule) -> String {
    let schedule_name = match args.schedule {
        ScheduleArg::Constant => "constant",
        ScheduleArg::Linear => "linear",
        ScheduleArg::Cosine => "cosine",
    };
    let data = args.data.file_name().map_or_else(|| args.data.display().to_string(), |n| n.to_string_lossy().into());
    format!(
        "{} {}, lr {:.1e} {schedule_name} warmup {}, {} steps of {} micro-batch(es), {data}",
        args.adapter.method(),
        args.adapter.adapter_name(),
        args.lr,
        schedule.warmup_steps,
        schedule.total_steps,
        args.grad_accum
    )
}

/// What every rank shares: the settings derived from the flags, the data and the schedule.
struct Run<'a> {
    args: &'a FinetuneArgs,
    targets: Vec<&'static str>,
    placement: (Device, DType),
    resume_from: Option<PathBuf>,
    plan: data::Plan,
    eval: Option<Vec<data::Row>>,
    max_seq_len: usize,
    schedule: Schedule,
    trajectory: serde_json::Value,
}

fn run_to_end(args: &FinetuneArgs) -> Result<train::Outcome> {
    args.check()?;
    let targets = args.adapter.targets()?;
    let world = args.ranks.world(args.device, args.adapter.base_format(), "train")?;
    let resume_from = resume_target(args)?;
    check_out(&args.out, args.resume.is_some())?;
    if let World::Spawn(n) = world {
        return spawn::gpus(n);
    }
    let placement = parallel::placement(&world, args.dtype.dtype(), "training")?;

    let (plan, eval, max_seq_len) = load_data(args)?;
    let total_steps = match args.max_steps {
        Some(n) => n,
        None => (0..args.epochs).map(|e| plan.steps_in_epoch(e)).sum(),
    };
    let schedule = Schedule {
        kind: match args.schedule {
            ScheduleArg::Constant => ScheduleKind::Constant,
            ScheduleArg::Linear => ScheduleKind::Linear,
            ScheduleArg::Cosine => ScheduleKind::Cosine,
        },
        peak_lr: args.lr,
        warmup_steps: args
            .warmup_steps
            .unwrap_or_else(|| (args.warmup_ratio * total_steps as f64).ceil() as u64)
            .min(total_steps),
        total_steps,
    };
    let trajectory = args.trajectory(&plan.fingerprint(), &targets);
    let run = Run { args, targets, placement, resume_from, plan, eval, max_seq_len, schedule, trajectory };
    parallel::run_as(&world, |group| train(&run, group))
}

/// Loads the model and trains it, as the only process or as one rank of `group` (rank 0 writes the files).
fn train(run: &Run, group: Option<Arc<dyn Communicator>>) -> Result<train::Outcome> {
    let Run { args, placement, .. } = *run;
    let lead = group.as_ref().is_none_or(|g| g.rank() == 0);
    let (mut model, mut optimizer, start) =
        load_model(args, &run.targets, run.resume_from.as_deref(), &run.trajectory, placement, group.as_ref())?;
    let shrink = "lower --micro-batch, --batch-tokens or --max-seq-len";
    let setup = crate::bench::memory::Setup {
        config: &model.config,
        format: args.adapter.base_format(),
        device: placement.0,
        compute: placement.1,
        tokens: args.batch_tokens.unwrap_or(args.micro_batch * run.max_seq_len),
        r: args.adapter.r,
        dora: args.adapter.dora,
        targets: &run.targets,
        checkpointing: args.gradient_checkpointing(),
        shards: model.sharded.as_ref().map_or(1, |s| s.group().world_size()),
        // --grad-accum is the step's micro-batches over all ranks.
        ranks: group.as_ref().map_or((1, 1), |g| (g.world_size(), args.grad_accum.div_ceil(g.world_size()))),
        plan: crate::bench::memory::Plan::default(),
    };
    // The ranks of a group plan within the least free memory of any, so that all make the same plan.
    let free = crate::bench::memory::Free::agreed(placement.0, group.as_deref())?;
    let (plan, estimate) =
        crate::bench::memory::budget_plan(&setup, free, args.memory_budget, args.park_layers, shrink)?;
    // The plan is worth a line where a budget chose it or it parks layers (the default on a GPU).
    let parks = crate::bench::memory::parked_layers(&crate::bench::memory::Setup { plan, ..setup }) > 0;
    plan.apply(&mut model, &mut optimizer)?;
    let plan_line = (args.memory_budget.is_some() || parks)
        .then(|| crate::bench::memory::describe_plan(plan, model.config.num_hidden_layers, &estimate));
    if let Some(line) = plan_line.as_ref().filter(|_| lead) {
        println!("{line}");
    }
    if lead {
        let n_params = model.trainable_params().iter().map(|p| p.value().elem_count()).sum();
        let rows = match args.batch_tokens {
            Some(n) => format!("up to {n} tokens"),
            None => format!("{} row(s) of up to {} tokens", args.micro_batch, run.max_seq_len),
        };
        let mut on = crate::device::describe(placement);
        if let Some(g) = &group {
            on += &format!(", {} {} ranks", g.world_size(), g.backend());
        }
        if let Some(s) = &model.sharded {
            on += &format!(", the base sharded ({:.2} GiB per rank)", s.size_in_bytes() as f64 / (1u64 << 30) as f64);
        }
        describe(args, &model, n_params, &run.schedule, rows, on);
        std::fs::create_dir_all(&args.out).with_context(|| format!("creating --out {}", args.out.display()))?;
        checkpoint::remove_partials(&args.out)?;
    }

    // The adapter names its base as peft expects: the Hub id for a cached snapshot, else the folder's full path.
    let base_model = crate::hub::cached_repo_id(&args.model).unwrap_or_else(|| {
        std::fs::canonicalize(&args.model).unwrap_or_else(|_| args.model.clone()).to_string_lossy().into_owned()
    });
    let subtitle = plot_subtitle(args, &run.schedule);
    let mut trainer = train::Trainer {
        model: &mut model,
        optimizer: &mut optimizer,
        plan: &run.plan,
        device: placement.0,
        eval: run.eval.as_deref(),
        schedule: run.schedule,
        settings: train::Settings {
            out: &args.out,
            base_model: &base_model,
            seed: args.seed,
            max_grad_norm: args.max_grad_norm,
            save_every: args.save_every,
            keep_last: args.keep_last,
            eval_every: args.eval_every,
            tensorboard: args.report_to == ReportTo::Tensorboard,
        },
        state: start,
        group: group.as_deref(),
    };
    let outcome = trainer
        .run()
        .map_err(|e| crate::bench::memory::out_of_memory_advice(e, args.memory_budget, plan_line.as_deref(), shrink))?;
    if outcome == train::Outcome::Finished && lead {
        save_adapter(&model, &args.out, Some(&base_model))?;
        copy_tokenizer_files(&args.model, &args.out)?;
        let curve = metrics::read_curve(&args.out.join(metrics::METRICS_FILE))?;
        let title = crate::hub::display_name(&args.model);
        plot::plot_loss(&curve, &title, &subtitle, &args.out.join(metrics::PLOT_FILE))?;
        println!(
            "adapter, tokenizer files, {} and {} written to {}",
            metrics::METRICS_FILE,
            metrics::PLOT_FILE,
            args.out.display()
        );
    }
    Ok(outcome)
}
