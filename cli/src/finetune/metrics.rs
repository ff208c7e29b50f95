//! The training log. `metrics.jsonl` gets one JSON object per optimizer step (step, loss, lr, grad_norm, tokens,
//! trained_tokens, elapsed) and one per evaluation (step, eval_loss, eval_tokens, elapsed), read back as the
//! [`Curve`] that `plot` draws. Losses are written with every digit (shortest round-trip),
//! so two runs' logs compare bit for bit. With `--report-to tensorboard` the same rows, with throughput and
//! memory, also go to a TensorBoard event file beside the log.

use anyhow::{Context, Result};
use qlora_models::formats::fsutil::write_atomic;
use qlora_models::formats::tfevents::EventWriter;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "loss.png";

/// One optimizer step as logged.
pub struct StepRow {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub elapsed: f64,
    /// Input tokens per second since this run (or resumption) started.
    pub tokens_per_s: f64,
    /// Memory in use and at peak, in bytes, where known.
    pub memory: Option<(usize, usize)>,
}

/// Appends rows to `OUT/metrics.jsonl`, each written whole with one `write` (a kill loses at most the last).
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
    events: Option<EventWriter>,
}

impl MetricsLog {
    /// Opens the log for a run that has done `done_steps` steps: a fresh run starts it empty; a resumed run keeps
    /// the rows up to its checkpoint and drops the ones the interrupted run wrote after it (they will be redone),
    /// so the finished log reads as one uninterrupted run. `tensorboard` adds an event file (a new one per run).
    pub fn open(out: &Path, done_steps: u64, tensorboard: bool) -> Result<Self> {
        let path = out.join(METRICS_FILE);
        let kept = match std::fs::read_to_string(&path) {
            Ok(text) if done_steps > 0 => text
                .lines()
                .filter(|line| {
                    let step = serde_json::from_str::<Value>(line).ok().and_then(|v| v.get("step")?.as_u64());
                    step.is_some_and(|s| s <= done_steps)
                })
                .map(|line| format!("{line}\n"))
                .collect(),
            Ok(_) => String::new(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        write_atomic(&path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let events = if tensorboard { Some(EventWriter::create(out, done_steps)?) } else { None };
        Ok(MetricsLog { file, path, events })
    }

    fn append(&mut self, row: Value) -> Result<()> {
        self.file.write_all(format!("{row}\n").as_bytes()).with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn step(&mut self, r: &StepRow) -> Result<()> {
        self.append(json!({
            "step": r.step,
            "loss": r.loss,
            "lr": r.lr,
            "grad_norm": r.grad_norm,
            "tokens": r.tokens,
            "trained_tokens": r.trained_tokens,
            "elapsed": r.elapsed,
        }))?;
        let Some(events) = &mut self.events else { return Ok(()) };
        // transformers' tag names, so runs of both compare in one TensorBoard.
        let mut scalars = vec![
            ("train/loss", r.loss),
            ("train/learning_rate", r.lr),
            ("train/grad_norm", r.grad_norm),
            ("train/tokens_per_second", r.tokens_per_s),
        ];
        if let Some((current, peak)) = r.memory {
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            scalars.extend([("memory/current_gib", gib(current)), ("memory/peak_gib", gib(peak))]);
        }
        Ok(events.scalars(r.step, &scalars)?)
    }

    pub fn eval(&mut self, step: u64, loss: f64, tokens: usize, elapsed: f64) -> Result<()> {
        self.append(json!({"step": step, "eval_loss": loss, "eval_tokens": tokens, "elapsed": elapsed}))?;
        match &mut self.events {
            Some(events) => Ok(events.scalars(step, &[("eval/loss", loss)])?),
            None => Ok(()),
        }
    }
}

/// (step, value) points of the training loss, the evaluation loss and the learning rate.
#[derive(Debug, Default, PartialEq)]
pub struct Curve {
    pub train: Vec<(u64, f64)>,
    pub eval: Vec<(u64, f64)>,
    pub lr: Vec<(u64, f64)>,
}

pub fn read_curve(path: &Path) -> Result<Curve> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut curve = Curve::default();
    for v in text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()) {
        let Some(step) = v.get("step").and_then(Value::as_u64) else { continue };
        if let Some(loss) = v.get("loss").and_then(Value::as_f64) {
            curve.train.push((step, loss));
        }
        if let Some(loss) = v.get("eval_loss").and_then(Value::as_f64) {
            curve.eval.push((step, loss));
        }
        if let Some(lr) = v.get("lr").and_then(Value::as_f64) {
            curve.lr.push((step, lr));
        }
    }
    Ok(curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumed_log_drops_rows_past_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let row = |step| StepRow {
            step,
            loss: 1.0 / step as f64,
            lr: 0.1,
            grad_norm: 1.0,
            tokens: 8,
            trained_tokens: 4,
            elapsed: 0.0,
            tokens_per_s: 8.0,
            memory: None,
        };
        let mut log = MetricsLog::open(dir.path(), 0, false).unwrap();
        for s in 1..=5 {
            log.step(&row(s)).unwrap();
        }
        log.eval(2, 0.7, 10, 0.0).unwrap();
        drop(log);
        let mut text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        text.push_str("{\"step\": 6, \"lo"); // a line cut short by a kill
        std::fs::write(dir.path().join(METRICS_FILE), text).unwrap();
        let mut log = MetricsLog::open(dir.path(), 3, false).unwrap();
        log.step(&row(4)).unwrap();
        let curve = read_curve(&dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(curve.train.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(curve.eval, vec![(2, 0.7)]);
        assert_eq!(curve.train[2].1, 1.0 / 3.0, "losses round-trip exactly");
        MetricsLog::open(dir.path(), 0, false).unwrap();
        assert_eq!(read_curve(&dir.path().join(METRICS_FILE)).unwrap(), Curve::default(), "a fresh run starts empty");
    }
}
