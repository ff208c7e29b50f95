//! The training log and its picture. `metrics.jsonl` gets one JSON object per optimizer step (step, loss, lr,
//! grad_norm, tokens, trained_tokens, elapsed) and one per evaluation (step, eval_loss, eval_tokens, elapsed);
//! `loss.png` plots both losses against the step. Losses are written with every digit (shortest round-trip),
//! so two runs' logs compare bit for bit.

use anyhow::{Context, Result};
use qlora_models::formats::fsutil::write_atomic;
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
}

/// Appends rows to `OUT/metrics.jsonl`, each written whole with one `write` (a kill loses at most the last).
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens the log for a run that has done `done_steps` steps: a fresh run starts it empty; a resumed run keeps
    /// the rows up to its checkpoint and drops the ones the interrupted run wrote after it (they will be redone),
    /// so the finished log reads as one uninterrupted run.
    pub fn open(out: &Path, done_steps: u64) -> Result<Self> {
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
        Ok(MetricsLog { file, path })
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
        }))
    }

    pub fn eval(&mut self, step: u64, loss: f64, tokens: usize, elapsed: f64) -> Result<()> {
        self.append(json!({"step": step, "eval_loss": loss, "eval_tokens": tokens, "elapsed": elapsed}))
    }
}

/// (step, loss) points of the training and the evaluation loss.
#[derive(Debug, Default, PartialEq)]
pub struct Curve {
    pub train: Vec<(u64, f64)>,
    pub eval: Vec<(u64, f64)>,
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
    }
    Ok(curve)
}

pub const PLOT_WIDTH: u32 = 800;
pub const PLOT_HEIGHT: u32 = 480;
const MARGIN: (i64, i64, i64, i64) = (70, 20, 20, 40); // left, right, top, bottom
const WHITE: [u8; 3] = [255, 255, 255];
const GRID: [u8; 3] = [225, 225, 225];
const AXIS: [u8; 3] = [60, 60, 60];
pub const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
pub const EVAL_COLOR: [u8; 3] = [255, 127, 14];

/// An RGB canvas with just what a line plot needs.
struct Canvas {
    w: i64,
    h: i64,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: u32, h: u32) -> Self {
        Canvas { w: w as i64, h: h as i64, px: WHITE.repeat((w * h) as usize) }
    }

    fn dot(&mut self, x: i64, y: i64, size: i64, c: [u8; 3]) {
        for yy in y - size / 2..y - size / 2 + size {
            for xx in x - size / 2..x - size / 2 + size {
                if (0..self.w).contains(&xx) && (0..self.h).contains(&yy) {
                    let i = 3 * (yy * self.w + xx) as usize;
                    self.px[i..i + 3].copy_from_slice(&c);
                }
            }
        }
    }

    /// Bresenham, `size` pixels thick.
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), size: i64, c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.dot(x, y, size, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Digits and '.' in a 3×5 pixel font, scaled by 2; `(x, y)` is the top-left corner.
    fn text(&mut self, text: &str, x: i64, y: i64, c: [u8; 3]) {
        for (k, ch) in text.chars().enumerate() {
            let rows: [u8; 5] = match ch {
                '0' => [7, 5, 5, 5, 7],
                '1' => [2, 6, 2, 2, 7],
                '2' => [7, 1, 7, 4, 7],
                '3' => [7, 1, 7, 1, 7],
                '4' => [5, 5, 7, 1, 1],
                '5' => [7, 4, 7, 1, 7],
                '6' => [7, 4, 7, 5, 7],
                '7' => [7, 1, 1, 1, 1],
                '8' => [7, 5, 7, 5, 7],
                '9' => [7, 5, 7, 1, 7],
                '.' => [0, 0, 0, 0, 2],
                _ => [0; 5],
            };
            for (r, bits) in rows.iter().enumerate() {
                for b in 0..3 {
                    if bits >> (2 - b) & 1 == 1 {
                        self.dot(x + k as i64 * 8 + b * 2, y + r as i64 * 2, 2, c);
                    }
                }
            }
        }
    }

    fn png(&self) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        let mut enc = png::Encoder::new(&mut bytes, self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("encoding the loss plot")?;
        writer.write_image_data(&self.px).context("encoding the loss plot")?;
        writer.finish().context("encoding the loss plot")?;
        Ok(bytes)
    }
}

/// Draws the training loss (blue line) and evaluation loss (orange line with dots) against the step, with
/// step and loss tick labels, and writes it as a PNG.
pub fn plot_loss(curve: &Curve, path: &Path) -> Result<()> {
    let mut c = Canvas::new(PLOT_WIDTH, PLOT_HEIGHT);
    let (left, right, top, bottom) = MARGIN;
    let (x0, x1, y0, y1) = (left, c.w - right, top, c.h - bottom);
    let all = || curve.train.iter().chain(&curve.eval);
    let (smin, smax) = all().fold((u64::MAX, 0), |(a, b), &(s, _)| (a.min(s), b.max(s)));
    let (lmin, lmax) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(_, l)| (a.min(l), b.max(l)));
    let (smin, smax) = if smin > smax { (0, 1) } else { (smin, smax.max(smin + 1)) };
    let (lmin, lmax) = match (lmin.is_finite(), lmax.is_finite()) {
        (true, true) if lmax > lmin => (lmin - 0.05 * (lmax - lmin), lmax + 0.05 * (lmax - lmin)),
        (true, true) => (lmin - 0.5, lmax + 0.5),
        _ => (0.0, 1.0),
    };
    let px = |(s, l): (u64, f64)| {
        let fx = (s - smin) as f64 / (smax - smin) as f64;
        let fy = (l - lmin) / (lmax - lmin);
        (x0 + (fx * (x1 - x0) as f64).round() as i64, y1 - (fy * (y1 - y0) as f64).round() as i64)
    };
    for i in 0..=4 {
        let y = y1 - (y1 - y0) * i / 4;
        c.line((x0, y), (x1, y), 1, GRID);
        let value = lmin + (lmax - lmin) * i as f64 / 4.0;
        let decimals = if lmax - lmin >= 10.0 {
            0
        } else if lmax - lmin >= 1.0 {
            1
        } else {
            3
        };
        let label = format!("{value:.decimals$}");
        c.text(&label, x0 - 8 - 8 * label.len() as i64, y - 5, AXIS);
        let step = smin + (smax - smin) * i as u64 / 4;
        let x = px((step, lmin)).0;
        c.line((x, y0), (x, y1), 1, GRID);
        let label = step.to_string();
        c.text(&label, x - 4 * label.len() as i64, y1 + 8, AXIS);
    }
    c.line((x0, y0), (x0, y1), 2, AXIS);
    c.line((x0, y1), (x1, y1), 2, AXIS);
    for (points, color) in [(&curve.train, TRAIN_COLOR), (&curve.eval, EVAL_COLOR)] {
        let finite: Vec<(i64, i64)> = points.iter().filter(|(_, l)| l.is_finite()).map(|&p| px(p)).collect();
        for pair in finite.windows(2) {
            c.line(pair[0], pair[1], 2, color);
        }
        if color == EVAL_COLOR || finite.len() == 1 {
            finite.iter().for_each(|&(x, y)| c.dot(x, y, 6, color));
        }
    }
    write_atomic(path, &c.png()?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        (info, buf)
    }

    #[test]
    fn plot_decodes_with_both_curves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PLOT_FILE);
        let curve = Curve {
            train: (1..=50).map(|s| (s, 4.0 / (s as f64).sqrt())).collect(),
            eval: vec![(10, 1.5), (20, 1.1), (50, 0.9)],
        };
        plot_loss(&curve, &path).unwrap();
        let (info, px) = decode(&path);
        assert_eq!((info.width, info.height, info.color_type), (PLOT_WIDTH, PLOT_HEIGHT, png::ColorType::Rgb));
        let has = |c: [u8; 3]| px.chunks_exact(3).any(|p| p == c);
        assert!(has(TRAIN_COLOR) && has(EVAL_COLOR) && has(AXIS));
        // Degenerate curves still draw: one point, a flat line, nothing at all.
        for curve in [Curve { train: vec![(3, 2.0)], eval: vec![] }, Curve::default()] {
            plot_loss(&curve, &path).unwrap();
            assert_eq!(decode(&path).0.width, PLOT_WIDTH);
        }
    }

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
        };
        let mut log = MetricsLog::open(dir.path(), 0).unwrap();
        for s in 1..=5 {
            log.step(&row(s)).unwrap();
        }
        log.eval(2, 0.7, 10, 0.0).unwrap();
        drop(log);
        let mut text = std::fs::read_to_string(dir.path().join(METRICS_FILE)).unwrap();
        text.push_str("{\"step\": 6, \"lo"); // a line cut short by a kill
        std::fs::write(dir.path().join(METRICS_FILE), text).unwrap();
        let mut log = MetricsLog::open(dir.path(), 3).unwrap();
        log.step(&row(4)).unwrap();
        let curve = read_curve(&dir.path().join(METRICS_FILE)).unwrap();
        assert_eq!(curve.train.iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(curve.eval, vec![(2, 0.7)]);
        assert_eq!(curve.train[2].1, 1.0 / 3.0, "losses round-trip exactly");
        MetricsLog::open(dir.path(), 0).unwrap();
        assert_eq!(read_curve(&dir.path().join(METRICS_FILE)).unwrap(), Curve::default(), "a fresh run starts empty");
    }
}
