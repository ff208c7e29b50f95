//! `qlora-rt toy`: trains `qlora_models::toy::ToyDecoder` and prints the loss as it falls.

use anyhow::{ensure, Context, Result};
use qlora_autograd::Tape;
use qlora_models::toy::{ToyConfig, ToyDecoder};
use qlora_optim::{clip_grad_norm, AdamW, AdamWConfig, Schedule, ScheduleKind};
use qlora_runtime::Rng;
use std::time::Instant;

#[derive(clap::Args)]
pub struct ToyArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Peak learning rate (cosine schedule, 10% warmup).
    #[arg(long, default_value_t = 3e-3)]
    lr: f64,
    /// Seed for initialisation and data.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print the loss every N steps.
    #[arg(long, default_value_t = 20)]
    log_every: u64,
}

pub fn run(args: &ToyArgs) -> Result<()> {
    ensure!(args.steps > 0, "--steps must be at least 1");
    ensure!(args.lr.is_finite() && args.lr > 0.0, "--lr must be a positive number, got {}", args.lr);
    let model = ToyDecoder::new(ToyConfig::default(), args.seed);
    let params = model.params();
    let n_params: usize = params.iter().map(|p| p.value().elem_count()).sum();
    let mut opt = AdamW::new(params.clone(), AdamWConfig { lr: args.lr, weight_decay: 0.01, ..Default::default() })?;
    let schedule = Schedule {
        kind: ScheduleKind::Cosine,
        peak_lr: args.lr,
        warmup_steps: args.steps / 10,
        total_steps: args.steps,
    };
    let mut rng = Rng::new(args.seed ^ 0x5EED);
    let cfg = model.config();
    println!(
        "toy decoder: {} layers, hidden {}, {} heads / {} KV heads, vocab {}, {} trained parameters (LoRA over NF4 projections, embeddings, norms, head); {} packed sequences of {} tokens per step",
        cfg.layers, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.vocab, n_params, cfg.seqs_per_batch, cfg.seq_len
    );
    let start = Instant::now();
    let (mut first, mut last) = (None, 0.0);
    for step in 0..args.steps {
        let (ids, targets, positions, cu) = model.sample_batch(&mut rng);
        let tape = Tape::new();
        let loss =
            model.loss(&tape, &ids, &targets, &positions, &cu).with_context(|| format!("forward at step {step}"))?;
        let value = loss.value().to_scalar::<f64>()?;
        ensure!(value.is_finite(), "loss became {value} at step {}", step + 1);
        tape.backward(&loss).with_context(|| format!("backward at step {step}"))?;
        let norm = clip_grad_norm(&params, 1.0)?;
        opt.set_lr(schedule.lr_at(step));
        opt.step()?;
        first.get_or_insert(value);
        last = value;
        if (step + 1) % args.log_every.max(1) == 0 || step == 0 || step + 1 == args.steps {
            println!("step {:>5}  loss {value:.4}  grad-norm {norm:.3}  lr {:.2e}", step + 1, schedule.lr_at(step));
        }
    }
    let first = first.expect("at least one step ran");
    println!(
        "loss {first:.4} -> {last:.4} ({:.1}% lower) in {:.1}s; chance level is ln({}) = {:.3}",
        100.0 * (1.0 - last / first),
        start.elapsed().as_secs_f64(),
        cfg.vocab,
        (cfg.vocab as f64).ln()
    );
    Ok(())
}
