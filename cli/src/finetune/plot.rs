//! `loss.png`, drawn by hand: a title (the model, then the run's settings), the training and evaluation losses
//! against the step with a legend, and below on the same step axis the learning rate. Lettering is the
//! public-domain 8x8 bitmap font of `font8x8`.
//!
//! Owns: the picture. Must not own reading the metrics (`metrics`).

use super::metrics::Curve;
use anyhow::{Context, Result};
use qlora_models::formats::fsutil::write_atomic;
use std::path::Path;

pub const PLOT_WIDTH: u32 = 800;
pub const PLOT_HEIGHT: u32 = 600;
/// Left edge of both panels: room for tick labels of up to 8 characters and the rotated axis title.
const LEFT: i64 = 96;
const RIGHT: i64 = 24;
/// The loss panel's and the learning-rate panel's top and bottom rows.
const LOSS_ROWS: (i64, i64) = (64, 390);
const LR_ROWS: (i64, i64) = (416, 528);
const WHITE: [u8; 3] = [255, 255, 255];
const GRID: [u8; 3] = [225, 225, 225];
pub const AXIS: [u8; 3] = [60, 60, 60];
pub const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
pub const EVAL_COLOR: [u8; 3] = [255, 127, 14];
pub const LR_COLOR: [u8; 3] = [44, 160, 44];

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

    /// `text` in the 8x8 font scaled by `scale`, its top-left corner at `(x, y)`; `upward` turns it a quarter
    /// turn counter-clockwise to read bottom to top from `(x, y)`, its bottom-left corner. Non-ASCII
    /// characters draw as '?'.
    fn text(&mut self, text: &str, (x, y): (i64, i64), scale: i64, upward: bool, c: [u8; 3]) {
        for (k, ch) in text.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY[if ch.is_ascii() { ch as usize } else { '?' as usize }];
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    // Bit 0 is the glyph's leftmost pixel.
                    if bits >> col & 1 == 1 {
                        let along = (k as i64 * 8 + col) * scale;
                        let across = row as i64 * scale;
                        let (px, py) = if upward { (x + across, y - along) } else { (x + along, y + across) };
                        self.dot(px + scale / 2, py + scale / 2, scale, c);
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

/// Width in pixels of `text` at `scale`.
fn width(text: &str, scale: i64) -> i64 {
    text.chars().count() as i64 * 8 * scale
}

/// A panel: its pixel box and the step and value ranges it maps onto it.
struct Panel {
    x: (i64, i64),
    y: (i64, i64),
    steps: (u64, u64),
    values: (f64, f64),
}

impl Panel {
    fn px(&self, (s, v): (u64, f64)) -> (i64, i64) {
        let fx = (s - self.steps.0) as f64 / (self.steps.1 - self.steps.0) as f64;
        let fy = (v - self.values.0) / (self.values.1 - self.values.0);
        let (x, y) = (self.x, self.y);
        (x.0 + (fx * (x.1 - x.0) as f64).round() as i64, y.1 - (fy * (y.1 - y.0) as f64).round() as i64)
    }

    /// Grid, axes, five value ticks labelled by `label`, the value axis titled `title`, and under the panel
    /// the step ticks when `step_labels`.
    fn axes(&self, c: &mut Canvas, title: &str, label: impl Fn(f64) -> String, step_labels: bool) {
        let ((x0, x1), (y0, y1)) = (self.x, self.y);
        for i in 0..=4 {
            let y = y1 - (y1 - y0) * i / 4;
            c.line((x0, y), (x1, y), 1, GRID);
            let text = label(self.values.0 + (self.values.1 - self.values.0) * i as f64 / 4.0);
            c.text(&text, (x0 - 8 - width(&text, 1), y - 4), 1, false, AXIS);
            let step = self.steps.0 + (self.steps.1 - self.steps.0) * i as u64 / 4;
            let x = self.px((step, self.values.0)).0;
            c.line((x, y0), (x, y1), 1, GRID);
            if step_labels {
                let text = step.to_string();
                c.text(&text, (x - width(&text, 1) / 2, y1 + 8), 1, false, AXIS);
            }
        }
        c.line((x0, y0), (x0, y1), 2, AXIS);
        c.line((x0, y1), (x1, y1), 2, AXIS);
        c.text(title, (12, (y0 + y1) / 2 + width(title, 1) / 2), 1, true, AXIS);
    }

    /// A line through the finite points, with dots where `dots` (or where a line cannot show one point).
    fn series(&self, c: &mut Canvas, points: &[(u64, f64)], color: [u8; 3], dots: bool) {
        let finite: Vec<(i64, i64)> = points.iter().filter(|(_, v)| v.is_finite()).map(|&p| self.px(p)).collect();
        for pair in finite.windows(2) {
            c.line(pair[0], pair[1], 2, color);
        }
        if dots || finite.len() == 1 {
            finite.iter().for_each(|&(x, y)| c.dot(x, y, 6, color));
        }
    }
}

/// The range of the finite `values` with 5% headroom, or around the one value, or (0, 1) without any.
fn value_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) =
        values.filter(|v| v.is_finite()).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    match (lo.is_finite(), hi.is_finite()) {
        (true, true) if hi > lo => (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)),
        (true, true) => (lo - 0.5, hi + 0.5),
        _ => (0.0, 1.0),
    }
}

/// Tick labels with as many decimals as the range needs.
fn loss_label(range: f64) -> impl Fn(f64) -> String {
    let decimals = if range >= 10.0 {
        0
    } else if range >= 1.0 {
        1
    } else {
        3
    };
    move |v| format!("{v:.decimals$}")
}

/// Draws the plot of `curve` under the two title lines and writes it as a PNG.
pub fn plot_loss(curve: &Curve, title: &str, subtitle: &str, path: &Path) -> Result<()> {
    let mut c = Canvas::new(PLOT_WIDTH, PLOT_HEIGHT);
    c.text(title, ((c.w - width(title, 2)).max(8) / 2, 10), 2, false, AXIS);
    c.text(subtitle, ((c.w - width(subtitle, 1)).max(8) / 2, 36), 1, false, AXIS);
    let all = || curve.train.iter().chain(&curve.eval).chain(&curve.lr);
    let (smin, smax) = all().fold((u64::MAX, 0), |(a, b), &(s, _)| (a.min(s), b.max(s)));
    let steps = if smin > smax { (0, 1) } else { (smin, smax.max(smin + 1)) };
    let x = (LEFT, c.w - RIGHT);

    let losses = value_range(curve.train.iter().chain(&curve.eval).map(|p| p.1));
    let loss = Panel { x, y: LOSS_ROWS, steps, values: losses };
    loss.axes(&mut c, "loss", loss_label(losses.1 - losses.0), false);
    loss.series(&mut c, &curve.train, TRAIN_COLOR, false);
    loss.series(&mut c, &curve.eval, EVAL_COLOR, true);

    // The rate starts from zero so that warmup and decay read as fractions of the peak.
    let peak = curve.lr.iter().map(|p| p.1).filter(|v| v.is_finite()).fold(0.0, f64::max);
    let lr = Panel { x, y: LR_ROWS, steps, values: (0.0, if peak > 0.0 { peak * 1.05 } else { 1.0 }) };
    lr.axes(&mut c, "learning rate", |v| if v == 0.0 { "0".into() } else { format!("{v:.1e}") }, true);
    lr.series(&mut c, &curve.lr, LR_COLOR, false);
    c.text("step", ((x.0 + x.1 - width("step", 1)) / 2, LR_ROWS.1 + 28), 1, false, AXIS);

    // The legend, in the loss panel's top-right corner: a line for each series drawn.
    let entries: Vec<(&str, [u8; 3])> = [("train", TRAIN_COLOR, &curve.train), ("eval", EVAL_COLOR, &curve.eval)]
        .into_iter()
        .filter(|(_, _, points)| !points.is_empty())
        .map(|(name, color, _)| (name, color))
        .collect();
    if !entries.is_empty() {
        let (w, h) = (88, 12 + 16 * entries.len() as i64);
        let (lx, ly) = (x.1 - w - 8, LOSS_ROWS.0 + 8);
        for yy in ly..ly + h {
            c.line((lx, yy), (lx + w, yy), 1, WHITE);
        }
        for (a, b) in [((lx, ly), (lx + w, ly)), ((lx + w, ly), (lx + w, ly + h)), ((lx, ly + h), (lx + w, ly + h))] {
            c.line(a, b, 1, AXIS);
        }
        c.line((lx, ly), (lx, ly + h), 1, AXIS);
        for (i, (name, color)) in entries.into_iter().enumerate() {
            let y = ly + 14 + 16 * i as i64;
            c.line((lx + 8, y), (lx + 32, y), 2, color);
            if color == EVAL_COLOR {
                c.dot(lx + 20, y, 6, color);
            }
            c.text(name, (lx + 40, y - 4), 1, false, AXIS);
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
    fn plot_decodes_with_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let curve = Curve {
            train: (1..=50).map(|s| (s, 4.0 / (s as f64).sqrt())).collect(),
            eval: vec![(10, 1.5), (20, 1.1), (50, 0.9)],
            lr: (1..=50).map(|s| (s, 2e-4 * (s as f64 / 5.0).min(1.0))).collect(),
        };
        plot_loss(&curve, "org/model", "QLoRA r 8", &path).unwrap();
        let (info, px) = decode(&path);
        assert_eq!((info.width, info.height, info.color_type), (PLOT_WIDTH, PLOT_HEIGHT, png::ColorType::Rgb));
        let has = |c: [u8; 3]| px.chunks_exact(3).any(|p| p == c);
        assert!(has(TRAIN_COLOR) && has(EVAL_COLOR) && has(LR_COLOR) && has(AXIS));
        // Degenerate curves still draw: one point, nothing at all; a title wider than the picture is cut.
        for curve in [Curve { train: vec![(3, 2.0)], eval: vec![], lr: vec![(3, 0.0)] }, Curve::default()] {
            plot_loss(&curve, &"x".repeat(200), "é", &path).unwrap();
            assert_eq!(decode(&path).0.width, PLOT_WIDTH);
        }
    }
}
