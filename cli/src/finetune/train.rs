//! The step loop. Each optimizer step runs [`super::step::optimizer_step`] over `grad_accum` micro-batches at the
//! scheduled learning rate; the data order derives from (seed, epoch), so a resumed run continues bit for bit.
//!
//! After each step: a metrics row, the progress bar, evaluation (dropout off) and a checkpoint when due. A
//! non-finite loss or gradient norm stops the run before the update, naming the step and the last good
//! checkpoint; Ctrl-C (or SIGTERM) finishes the step, writes a checkpoint and stops.
//!
//! As one rank of a data-parallel group ([`super::parallel`]), every rank runs the same steps and evaluations; rank 0
//! alone hears Ctrl-C (the group stops together) and writes metrics, progress and checkpoints.

use super::checkpoint::{self, SaveTo, TrainerState};
use super::data::{self, Plan, Row};
use super::metrics::{MetricsLog, StepRow};
use super::parallel;
use super::parallel::Tokens;
use super::step::{self, NonFinite, StepConfig, StepOutcome};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use qlora_autograd::Tape;
use qlora_models::transformer::CausalLm;
use qlora_optim::{AdamW, Schedule};
use qlora_runtime::dist::Communicator;
use qlora_runtime::Device;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped by Ctrl-C or SIGTERM after writing a checkpoint.
    Interrupted,
}

/// Interrupt signals received; the first asks for a clean stop, the second exits at once.
static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);
/// This process runs rank 0 (or alone): it says what an interrupt does; the other ranks' processes act silently.
static LEAD: AtomicBool = AtomicBool::new(false);
/// The handler, installed once per process (a process may run several in-process ranks; a signal handler is the
/// process's).
static HANDLER: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Every rank's process hears interrupts, so that any interrupted rank stops the group after the same step
/// (`parallel::agree_to_stop`).
fn install_interrupt_handler(lead: bool) -> Result<()> {
    if lead {
        LEAD.store(true, Ordering::SeqCst);
    }
    let installed = HANDLER.get_or_init(|| {
        ctrlc::set_handler(|| {
            let lead = LEAD.load(Ordering::SeqCst);
            if INTERRUPTS.fetch_add(1, Ordering::SeqCst) == 0 {
                if lead {
                    eprintln!(
                        "qlora-rt: interrupted: finishing this step and writing a checkpoint (again to quit at once)"
                    );
                }
            } else {
                if lead {
                    eprintln!("qlora-rt: interrupted again: quitting without a checkpoint");
                }
                std::process::exit(130);
            }
        })
        .map_err(|e| e.to_string())
    });
    installed.clone().map_err(|e| anyhow!("installing the Ctrl-C handler: {e}"))
}

fn interrupted() -> bool {
    INTERRUPTS.load(Ordering::SeqCst) > 0
}

pub struct Settings<'a> {
    pub out: &'a Path,
    pub base_model: &'a str,
    pub seed: u64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub save_every: u64,
    pub keep_last: usize,
    pub eval_every: u64,
    /// Also log to a TensorBoard event file (`--report-to tensorboard`).
    pub tensorboard: bool,
}

pub struct Trainer<'a> {
    pub model: &'a mut CausalLm,
    pub optimizer: &'a mut AdamW,
    pub plan: &'a Plan,
    /// Where the model lives; batches are built on the host and moved there.
    pub device: Device,
    pub eval: Option<&'a [Row]>,
    pub schedule: Schedule,
    pub settings: Settings<'a>,
    pub state: TrainerState,
    /// The data-parallel group this process is a rank of; `None` trains alone.
    pub group: Option<&'a dyn Communicator>,
}

/// What one optimizer step did.
struct StepStats {
    loss: f64,
    grad_norm: f64,
    lr: f64,
    tokens: usize,
    trained_tokens: usize,
}

/// Memory in use and at peak, in bytes: the GPU allocator's on CUDA, the process's resident set on the CPU
/// (Linux's /proc/self/status; None elsewhere).
fn memory_in_use(device: Device) -> Option<(usize, usize)> {
    if let Device::Cuda(ordinal) = device {
        let m = qlora_runtime::cuda_device(ordinal).ok()?.memory_stats();
        return Some((m.current, m.peak));
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib = |key: &str| -> Option<usize> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        Some(line[key.len()..].trim().trim_end_matches("kB").trim().parse::<usize>().ok()? * 1024)
    };
    Some((kib("VmRSS:")?, kib("VmHWM:")?))
}

/// The GPU's allocator, current and peak, as "mem 1.23/1.50 GiB" (empty on the CPU).
fn device_memory(device: Device) -> String {
    match memory_in_use(device) {
        Some((current, peak)) if matches!(device, Device::Cuda(_)) => {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            format!("mem {:.2}/{:.2} GiB", gib(current), gib(peak))
        }
        _ => String::new(),
    }
}

/// The progress bar on a terminal; elsewhere (logs, pipes) a plain line every 5% of the run.
struct Progress {
    bar: ProgressBar,
    total: u64,
    device: Device,
}

impl Progress {
    fn new(total: u64, done: u64, device: Device) -> Self {
        let style = ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] step {pos}/{len} {msg} ETA {eta}")
            .expect("the template is valid")
            .progress_chars("=> ");
        // Cleared however the loop ends, so that the summary or an error starts on a line of its own.
        let bar = ProgressBar::new(total).with_position(done).with_style(style).with_finish(ProgressFinish::AndClear);
        Progress { bar, total, device }
    }

    fn println(&self, line: &str) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn step(&self, step: u64, s: &StepStats, tokens_per_s: f64) {
        self.bar.set_position(step);
        let mem = device_memory(self.device);
        let sep = if mem.is_empty() { "" } else { " " };
        self.bar.set_message(format!("loss {:.4} lr {:.2e} {tokens_per_s:.0} tok/s{sep}{mem}", s.loss, s.lr));
        let every = (self.total / 20).max(1);
        if self.bar.is_hidden() && (step == 1 || step % every == 0 || step == self.total) {
            let sep = if mem.is_empty() { "" } else { "  " };
            println!(
                "step {step}/{}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {tokens_per_s:.0} tok/s{sep}{mem}",
                self.total, s.loss, s.lr, s.grad_norm
            );
        }
    }
}

impl Trainer<'_> {
    /// Trains from `state` to the schedule's last step.
    pub fn run(&mut self) -> Result<Outcome> {
        let lead = self.group.is_none_or(|g| g.rank() == 0);
        install_interrupt_handler(lead)?;
        let total = self.schedule.total_steps;
        let out = self.settings.out;
        let mut log = lead.then(|| MetricsLog::open(out, self.state.step, self.settings.tensorboard)).transpose()?;
        let progress = lead.then(|| Progress::new(total, self.state.step, self.device));
        let (started, elapsed_before, step_before) = (Instant::now(), self.state.elapsed_s, self.state.step);
        let mut tokens_this_run = 0usize;
        let (mut first_loss, mut last_loss, mut last_eval) = (None, None, None);
        let mut epoch = self.plan.epoch(self.state.epoch);
        while self.state.step < total {
            if self.state.epoch_position >= epoch.len() {
                self.state.epoch += 1;
                self.state.epoch_position = 0;
                epoch = self.plan.epoch(self.state.epoch);
            }
            let end = (self.state.epoch_position + self.plan.grad_accum).min(epoch.len());
            let stats = self.step(&epoch[self.state.epoch_position..end])?;
            self.state.step += 1;
            self.state.epoch_position = end;
            self.state.tokens_seen += stats.tokens as u64;
            self.state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
            tokens_this_run += stats.tokens;
            let step = self.state.step;
            first_loss.get_or_insert(stats.loss);
            last_loss = Some(stats.loss);
            let every = |n: u64| n > 0 && step % n == 0;
            if let (Some(log), Some(progress)) = (log.as_mut(), progress.as_ref()) {
                let tokens_per_s = tokens_this_run as f64 / started.elapsed().as_secs_f64().max(1e-9);
                log.step(&StepRow {
                    step,
                    loss: stats.loss,
                    lr: stats.lr,
                    grad_norm: stats.grad_norm,
                    tokens: stats.tokens,
                    trained_tokens: stats.trained_tokens,
                    elapsed: self.state.elapsed_s,
                    tokens_per_s,
                    memory: memory_in_use(self.device),
                })?;
                progress.step(step, &stats, tokens_per_s);
            }
            if self.eval.is_some() && (every(self.settings.eval_every) || step == total) {
                // Every rank evaluates, as a sharded base needs (each layer's gather takes every rank); rank 0 logs.
                let (loss, tokens) = self.eval_loss()?;
                if let (Some(log), Some(progress)) = (log.as_mut(), progress.as_ref()) {
                    log.eval(step, loss, tokens, self.state.elapsed_s)?;
                    progress.println(&format!("step {step}/{total}  eval loss {loss:.4}"));
                }
                last_eval = Some(loss);
            }
            let stop = match self.group {
                Some(group) => parallel::agree_to_stop(group, interrupted())?,
                None => interrupted(),
            };
            if every(self.settings.save_every) || stop {
                let dir = if lead { Some(self.save()?) } else { None };
                if stop {
                    if let (Some(progress), Some(dir)) = (&progress, dir) {
                        progress.bar.finish_and_clear();
                        eprintln!(
                            "qlora-rt: stopped at step {step} of {total}; checkpoint written to {}; continue with --resume",
                            dir.display()
                        );
                    }
                    return Ok(Outcome::Interrupted);
                }
            }
        }
        let Some(progress) = progress else { return Ok(Outcome::Finished) };
        progress.bar.finish_and_clear();
        let steps = self.state.step - step_before;
        let secs = started.elapsed().as_secs_f64();
        if let (Some(first), Some(last)) = (first_loss, last_loss) {
            let mem = device_memory(self.device);
            println!(
                "trained {steps} step(s) in {secs:.1}s ({:.2} steps/s, {:.0} tokens/s): loss {first:.4} → {last:.4}{}{}",
                steps as f64 / secs,
                tokens_this_run as f64 / secs,
                last_eval.map(|l| format!(", eval loss {l:.4}")).unwrap_or_default(),
                if mem.is_empty() { String::new() } else { format!("; {mem}") }
            );
            if let Some(split) = crate::bench::memory::describe_peak(self.device)? {
                println!("device memory {split}");
            }
        }
        Ok(Outcome::Finished)
    }

    /// One optimizer step over `micro` (row indices per micro-batch); `self.state.step` is its 0-based index.
    fn step(&mut self, micro: &[Vec<usize>]) -> Result<StepStats> {
        let step = self.state.step;
        let lr = self.schedule.lr_at(step);
        let config = StepConfig {
            device: self.device,
            seed: self.settings.seed,
            max_grad_norm: self.settings.max_grad_norm,
            lr,
        };
        let done = match self.group {
            None => self.step_alone(micro, step, &config),
            Some(group) => {
                let batches = micro.iter().map(|m| data::batch(&self.plan.rows, m)).collect::<Result<Vec<_>>>()?;
                parallel::optimizer_step(self.model, self.optimizer, group, &batches, step, &config, &mut ())
            }
        };
        let (outcome, tokens) = match done {
            Ok(done) => done,
            Err(e) => match e.downcast::<NonFinite>() {
                Ok(stop) => bail!("{stop}; {}", self.last_good_checkpoint()?),
                Err(e) => return Err(e),
            },
        };
        let (loss, grad_norm) = (outcome.loss, outcome.grad_norm);
        Ok(StepStats { loss, grad_norm, lr, tokens: tokens.all, trained_tokens: tokens.trained })
    }

    fn step_alone(&mut self, micro: &[Vec<usize>], step: u64, config: &StepConfig) -> Result<(StepOutcome, Tokens)> {
        let batches = micro.iter().map(|members| data::batch(&self.plan.rows, members)).collect::<Result<Vec<_>>>()?;
        let trained = batches.iter().map(|b| b.trained_tokens()).sum();
        let all = batches.iter().map(|b| b.ids.elem_count()).sum();
        let outcome = step::optimizer_step(self.model, self.optimizer, &batches, step, config, &mut ())?;
        Ok((outcome, Tokens { all, trained }))
    }

    fn last_good_checkpoint(&self) -> Result<String> {
        let done = self.state.step;
        Ok(match checkpoint::list(self.settings.out)?.into_iter().rev().find(|(s, _)| *s <= done) {
            Some((_, dir)) => {
                format!("the last good checkpoint is {} (a lower --lr may help)", dir.display())
            }
            None => "no checkpoint was written before it (a lower --lr may help)".into(),
        })
    }

    fn save(&self) -> Result<std::path::PathBuf> {
        let to =
            SaveTo { out: self.settings.out, base_model: self.settings.base_model, keep_last: self.settings.keep_last };
        checkpoint::save(&to, self.model, self.optimizer, &self.state)
    }

    /// Mean loss per trained token over the evaluation rows, with adapter dropout off, and the tokens it averages.
    fn eval_loss(&mut self) -> Result<(f64, usize)> {
        let rows = self.eval.unwrap_or_default();
        // The same parameters without dropout (peft's eval mode); the training adapters come back afterwards.
        let mut training = Vec::new();
        for proj in self.model.projections_mut()? {
            let eval = proj.adapter.as_ref().map(|a| a.without_dropout());
            training.push(std::mem::replace(&mut proj.adapter, eval));
        }
        let result = (|| -> Result<(f64, usize)> {
            let (mut sum, mut tokens) = (0.0, 0);
            for members in self.plan.in_order(rows) {
                let batch = data::batch(rows, &members)?;
                tokens += batch.trained_tokens();
                let batch = batch.to_device(self.device)?;
                let tape = Tape::new();
                let loss = tape.no_grad(|| self.model.loss(&tape, &batch, 1.0, 0))?;
                sum += loss.value().to_scalar::<f64>()?;
            }
            Ok((sum / tokens.max(1) as f64, tokens))
        })();
        for (proj, adapter) in self.model.projections_mut()?.into_iter().zip(training) {
            proj.adapter = adapter;
        }
        result.with_context(|| format!("evaluating at step {}", self.state.step))
    }
}
