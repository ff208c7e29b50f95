//! Training and evaluation data: dataset records (JSONL, a JSON array or Parquet) → examples (template,
//! completion-only labels) → rows of at most `max_seq_len` tokens (packed or one example each) → micro-batches,
//! reshuffled every epoch from the seed.
//! Bad rows are counted and reported, never fatal one by one; a set with nothing to train on is an error.

use anyhow::{bail, ensure, Context, Result};
use qlora_models::data::files::read_records;
use qlora_models::data::pack::{pack, row_batch, Example, PackStats};
use qlora_models::data::tokenize::Formatter;
use qlora_models::transformer::Batch;
use qlora_runtime::Rng;
use std::path::Path;

/// Salts that keep the split and the epoch shuffles on streams of their own, whatever the seed.
const SPLIT_SALT: u64 = 0x5011_7DA7_A5E7_0001;
const SHUFFLE_SALT: u64 = 0x5011_7DA7_A5E7_0002;

/// A packed row: whole examples whose lengths add up to at most `max_seq_len`.
pub type Row = Vec<Example>;

pub struct Sources<'a> {
    pub train: &'a Path,
    pub eval_file: Option<&'a Path>,
    pub eval_split: Option<f64>,
}

pub struct Shaping {
    pub max_seq_len: usize,
    pub packing: bool,
    pub skip_bad_lines: bool,
    pub seed: u64,
}

pub struct Sets {
    pub train: Vec<Row>,
    pub eval: Option<Vec<Row>>,
}

/// Examples of one file, with what was dropped on the way.
struct Formatted {
    examples: Vec<Example>,
    records: usize,
    bad_lines: usize,
    unformattable: usize,
    /// The first reason a record could not be formatted, for the report.
    first_reason: Option<String>,
}

fn format_file(path: &Path, formatter: &Formatter, skip_bad_lines: bool) -> Result<Formatted> {
    let read = read_records(path, skip_bad_lines)?;
    if read.skipped > 0 {
        eprintln!(
            "qlora-rt: warning: {}: skipped {} malformed row(s) ({}{})",
            path.display(),
            read.skipped,
            read.skipped_reasons.first().map(String::as_str).unwrap_or(""),
            if read.skipped > 1 { ", ..." } else { "" }
        );
    }
    let mut out = Formatted {
        examples: Vec::with_capacity(read.records.len()),
        records: read.records.len(),
        bad_lines: read.skipped,
        unformattable: 0,
        first_reason: None,
    };
    for record in &read.records {
        match formatter.example(record) {
            Ok(e) => out.examples.push(e),
            Err(reason) => {
                out.unformattable += 1;
                out.first_reason.get_or_insert(reason);
            }
        }
    }
    if out.unformattable > 0 {
        eprintln!(
            "qlora-rt: warning: {}: skipped {} record(s) that could not be formatted (first: {})",
            path.display(),
            out.unformattable,
            out.first_reason.as_deref().unwrap_or("")
        );
    }
    Ok(out)
}

/// Rows from examples: best-fit packing, or one example per row. Examples are truncated to `max_len`; those
/// left with no trained token are dropped (both counted).
fn rows(examples: Vec<Example>, max_len: usize, packing: bool) -> (Vec<Row>, PackStats) {
    if packing {
        return pack(examples, max_len);
    }
    let mut stats = PackStats::default();
    let mut rows = Vec::with_capacity(examples.len());
    for e in examples {
        let (mut r, s) = pack(vec![e], max_len);
        stats.truncated += s.truncated;
        stats.untrainable += s.untrainable;
        rows.append(&mut r);
    }
    (rows, stats)
}

/// Packs one set and reports what happened to it; `what` names it in messages ("training", "evaluation").
fn finish(what: &str, path: &Path, f: &Formatted, examples: Vec<Example>, shaping: &Shaping) -> Result<Vec<Row>> {
    let n = examples.len();
    let (rows, stats) = rows(examples, shaping.max_seq_len, shaping.packing);
    if stats.truncated > 0 {
        eprintln!(
            "qlora-rt: warning: {}: {} {what} example(s) longer than {} tokens were truncated",
            path.display(),
            stats.truncated,
            shaping.max_seq_len
        );
    }
    if stats.untrainable > 0 {
        eprintln!(
            "qlora-rt: warning: {}: skipped {} {what} example(s) with no trainable token",
            path.display(),
            stats.untrainable
        );
    }
    if rows.is_empty() {
        bail!(
            "{}: no trainable tokens in the {what} data: {} record(s) read, {} malformed row(s) skipped, {} could \
             not be formatted{}, {} of {n} example(s) had no trainable token",
            path.display(),
            f.records,
            f.bad_lines,
            f.unformattable,
            f.first_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
            stats.untrainable,
        );
    }
    let tokens: usize = rows.iter().flatten().map(|e| e.ids.len()).sum();
    let trained: usize = rows.iter().flatten().map(Example::trained_targets).sum();
    println!(
        "{what} data: {} example(s) in {} row(s), {tokens} tokens, {trained} trained",
        n - stats.untrainable,
        rows.len()
    );
    Ok(rows)
}

/// Reads, formats and packs the training set and the evaluation set, if any.
pub fn prepare(src: &Sources, formatter: &Formatter, shaping: &Shaping) -> Result<Sets> {
    let mut train = format_file(src.train, formatter, shaping.skip_bad_lines)?;
    let mut train_examples = std::mem::take(&mut train.examples);
    let mut split_examples = None;
    if let Some(fraction) = src.eval_split {
        let n = train_examples.len();
        ensure!(n >= 2, "{}: --eval-split needs at least 2 usable examples, found {n}", src.train.display());
        let held = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
        let mut order: Vec<usize> = (0..n).collect();
        Rng::new(shaping.seed ^ SPLIT_SALT).shuffle(&mut order);
        let mut is_eval = vec![false; n];
        order[..held].iter().for_each(|&i| is_eval[i] = true);
        let (eval, kept): (Vec<_>, Vec<_>) =
            train_examples.into_iter().zip(is_eval).partition(|(_, held_out)| *held_out);
        train_examples = kept.into_iter().map(|(e, _)| e).collect();
        split_examples = Some(eval.into_iter().map(|(e, _)| e).collect::<Vec<_>>());
    }
    let train_rows = finish("training", src.train, &train, train_examples, shaping)?;
    let eval = match (src.eval_file, split_examples) {
        (Some(path), _) => {
            let mut f = format_file(path, formatter, shaping.skip_bad_lines)?;
            let examples = std::mem::take(&mut f.examples);
            Some(finish("evaluation", path, &f, examples, shaping)?)
        }
        (None, Some(examples)) => Some(finish("evaluation", src.train, &train, examples, shaping)?),
        (None, None) => None,
    };
    Ok(Sets { train: train_rows, eval })
}

/// How rows are grouped into micro-batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    /// This many rows each (the last micro-batch of an epoch may hold fewer).
    Rows(usize),
    /// Rows in order until the next would pass this many tokens; at least one row each.
    Tokens(usize),
}

/// Consecutive runs of `order` as micro-batches.
pub fn group(order: &[usize], rows: &[Row], grouping: Grouping) -> Vec<Vec<usize>> {
    match grouping {
        Grouping::Rows(n) => order.chunks(n.max(1)).map(<[usize]>::to_vec).collect(),
        Grouping::Tokens(budget) => {
            let len = |i: usize| rows[i].iter().map(|e| e.ids.len()).sum::<usize>();
            let mut out: Vec<Vec<usize>> = Vec::new();
            let mut tokens = 0;
            for &i in order {
                match out.last_mut() {
                    Some(current) if tokens + len(i) <= budget => current.push(i),
                    _ => {
                        out.push(vec![i]);
                        tokens = 0;
                    }
                }
                tokens += len(i);
            }
            out
        }
    }
}

/// One micro-batch as a packed model batch: every example of its rows, attention kept within each example.
pub fn batch(rows: &[Row], members: &[usize]) -> Result<Batch> {
    let examples: Vec<Example> = members.iter().flat_map(|&i| rows[i].iter().cloned()).collect();
    row_batch(&examples).context("building a batch")
}

/// The order of training: each epoch a fresh seeded shuffle of the rows, grouped into micro-batches, and
/// `grad_accum` consecutive micro-batches per optimizer step (an epoch's last step may take fewer).
pub struct Plan {
    pub rows: Vec<Row>,
    grouping: Grouping,
    pub grad_accum: usize,
    seed: u64,
}

impl Plan {
    pub fn new(rows: Vec<Row>, grouping: Grouping, grad_accum: usize, seed: u64) -> Self {
        Plan { rows, grouping, grad_accum, seed }
    }

    /// The micro-batches of `epoch`, as row indices: a pure function of (seed, epoch), so a resumed run
    /// rebuilds exactly the order it was interrupted in.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.rows.len()).collect();
        let mix = (epoch.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Rng::new(self.seed ^ SHUFFLE_SALT ^ mix).shuffle(&mut order);
        group(&order, &self.rows, self.grouping)
    }

    /// Micro-batches over other rows (the evaluation set), in their order.
    pub fn in_order(&self, rows: &[Row]) -> Vec<Vec<usize>> {
        group(&(0..rows.len()).collect::<Vec<_>>(), rows, self.grouping)
    }

    pub fn steps_in_epoch(&self, epoch: u64) -> u64 {
        self.epoch(epoch).len().div_ceil(self.grad_accum) as u64
    }

    /// A hash of the rows' tokens and labels (FNV-1a, 64 bits): the data a checkpoint was trained on.
    pub fn fingerprint(&self) -> String {
        let mut h = Fnv::default();
        for e in self.rows.iter().flatten() {
            h.write(&(e.ids.len() as u64).to_le_bytes());
            e.ids.iter().chain(&e.labels).for_each(|x| h.write(&x.to_le_bytes()));
        }
        format!("{:016x}", h.0)
    }
}

/// FNV-1a, 64 bits: a stable hash (std's `DefaultHasher` may change between Rust releases).
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(len: usize) -> Row {
        vec![Example { ids: vec![7; len], labels: vec![7; len] }]
    }

    #[test]
    fn grouping_by_rows_and_by_tokens() {
        let rows: Vec<Row> = [5, 3, 8, 2, 6].map(row).to_vec();
        let order = [0, 1, 2, 3, 4];
        assert_eq!(group(&order, &rows, Grouping::Rows(2)), vec![vec![0, 1], vec![2, 3], vec![4]]);
        // 5+3 ≤ 10, then 8 alone (8+2 = 10 fits), then 6.
        assert_eq!(group(&order, &rows, Grouping::Tokens(10)), vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(group(&order, &rows, Grouping::Tokens(4)), vec![vec![0], vec![1], vec![2], vec![3], vec![4]]);
    }

    #[test]
    fn epochs_are_reproducible_permutations() {
        let plan = Plan::new((1..=9).map(row).collect(), Grouping::Rows(2), 2, 42);
        let (a, b) = (plan.epoch(0), plan.epoch(1));
        assert_eq!(a, plan.epoch(0), "the same epoch twice is the same order");
        assert_ne!(a, b, "each epoch reshuffles");
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..9).collect::<Vec<_>>());
        assert_eq!(plan.steps_in_epoch(0), 3, "5 micro-batches, 2 per step");
        let other = Plan::new((1..=9).map(row).collect(), Grouping::Rows(2), 2, 43);
        assert_ne!(plan.fingerprint(), Plan::new(vec![row(2)], Grouping::Rows(1), 1, 42).fingerprint());
        assert_eq!(plan.fingerprint(), other.fingerprint(), "the fingerprint is of the data, not the seed");
    }

    #[test]
    fn unpacked_rows_hold_one_example_each() {
        let examples = vec![row(4).remove(0), row(12).remove(0), row(1).remove(0)];
        let (r, stats) = rows(examples, 10, false);
        assert_eq!(r.iter().map(Vec::len).collect::<Vec<_>>(), vec![1, 1]);
        assert_eq!((stats.truncated, stats.untrainable), (1, 1));
    }
}
