//! `qlora-rt eval`: the loss of a model, with a PEFT adapter on top or not, over a dataset file of pre-tokenized
//! or plain-text rows: the token-weighted mean negative log-likelihood over every predicted position of every
//! row, and its perplexity; with several adapters (`--adapter NAME=DIR`, repeated), one result per adapter over
//! the base loaded once. Also owns the model-loading flags (`--device`, `--dtype`, `--quantize`) that other
//! commands which load a model share.

use crate::device::DeviceArg;
use crate::named_adapters::{read_all, AdapterArg};
use anyhow::{bail, Context, Result};
use qlora_autograd::{Tape, Var};
use qlora_models::data::files;
use qlora_models::data::jsonl::Record;
use qlora_models::formats::tokenizer::Tokenizer;
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_models::ModelConfig;
use qlora_runtime::nf4::DEFAULT_BLOCKSIZE;
use qlora_runtime::ops::cross_entropy::IGNORE_INDEX;
use qlora_runtime::{DType, Device};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    /// The design's training precision on a GPU (QLoRA's bf16 compute dtype).
    Bf16,
    /// Full precision on the GPU too (for parity checks against the CPU; slower).
    F32,
}

impl DtypeArg {
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F32 => DType::F32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantize {
    /// 4-bit NormalFloat base weights (QLoRA).
    Nf4,
    /// Dense base weights (plain LoRA).
    None,
}

impl Quantize {
    /// NF4 in the QLoRA paper's blocks of 64 (bitsandbytes' default), or dense in `dense`.
    pub fn base_format(self, double_quant: bool, dense: DType) -> BaseFormat {
        match self {
            Quantize::Nf4 => BaseFormat::Nf4 { blocksize: DEFAULT_BLOCKSIZE, double_quant },
            Quantize::None => BaseFormat::Dense(dense),
        }
    }
}

/// How a model is loaded and where it runs.
#[derive(clap::Args)]
pub struct LoadArgs {
    /// Where to run: cpu; cuda (the first GPU); auto (the first GPU when there is one, else CPU; a notice says which).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Precision of the dense base weights (and of compute on CUDA). On CPU compute is always f32: bf16 only
    /// stores the dense base weights rounded to bf16.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    dtype: DtypeArg,
    /// Quantize the decoder's linear weights on load: none, or nf4 (QLoRA's 4-bit NormalFloat, blocks of 64).
    /// A checkpoint saved 4-bit by bitsandbytes loads as saved with nf4 and is dequantized with none.
    #[arg(long, value_enum, default_value_t = Quantize::None)]
    quantize: Quantize,
    /// With --quantize nf4: quantize the per-block scales too (QLoRA's double quantization).
    #[arg(long)]
    double_quant: bool,
}

impl LoadArgs {
    /// Checks the flags against each other.
    pub fn base_format(&self) -> Result<BaseFormat> {
        if self.quantize == Quantize::None && self.double_quant {
            bail!("--double-quant needs --quantize nf4");
        }
        Ok(self.quantize.base_format(self.double_quant, self.dtype.dtype()))
    }

    /// Where to run and the compute precision there (`--dtype` on a GPU, f32 on the CPU); `auto` prints its
    /// one-line notice. Commands call it once their inputs have been checked, so that a failing command still
    /// prints only its error.
    pub fn placement(&self) -> Result<(Device, DType)> {
        crate::device::pick(self.device, self.dtype.dtype(), "running")
    }
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model folder (config.json and safetensors weights; tokenizer.json when the data has text rows), or a
    /// .gguf file (imported once into the qlora-rt cache).
    #[arg(long)]
    model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors) applied on top of the model, as DIR
    /// or NAME=DIR. Repeat it (each named) to evaluate several adapters over one base: one result per adapter.
    #[arg(long, value_name = "[NAME=]DIR")]
    adapter: Vec<AdapterArg>,
    /// JSONL file, one row per line (or a JSON array of rows, or Parquet): {"input_ids": [...]} with optional
    /// "labels" (-100 = not scored; no BOS or template added), or {"text": "..."} (tokenized, BOS as the
    /// tokenizer's config says).
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    load: LoadArgs,
    /// Rows are packed into forward passes of at most this many tokens (a longer row runs alone).
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// Print the result as one JSON object (loss, perplexity, tokens, rows, batches, seconds) on stdout, one line
    /// per adapter.
    #[arg(long)]
    json: bool,
}

/// One scored row: token ids and per-token labels (−100 = not a target).
struct Row {
    ids: Vec<i32>,
    labels: Vec<i32>,
}

/// What `--data` holds, validated against the vocabulary.
struct Data {
    rows: Vec<Row>,
    /// Rows read: non-blank lines of JSONL (rows that predict nothing are counted here but not kept).
    lines: usize,
}

/// Reads the rows of a JSONL file, a JSON array or a Parquet file (as finetune reads them); errors name the file and
/// the line (JSONL) or row. The tokenizer is loaded only if a text row needs it.
fn read_data(path: &Path, model_dir: &Path, vocab: usize) -> Result<Data> {
    let read = files::read_records(path, false)?;
    let mut rows = RowReader { model_dir, vocab, tokenizer: None, data: Data { rows: Vec::new(), lines: 0 } };
    for (record, at) in read.records.into_iter().zip(read.at) {
        rows.add(record, &|| format!("{}: {at}", path.display()))?;
    }
    Ok(rows.data)
}

/// Turns records into validated token rows.
struct RowReader<'a> {
    model_dir: &'a Path,
    vocab: usize,
    tokenizer: Option<Tokenizer>,
    data: Data,
}

impl RowReader<'_> {
    /// Adds one record read at `at` (the file and its line or row).
    fn add(&mut self, record: Record, at: &dyn Fn() -> String) -> Result<()> {
        let vocab = self.vocab;
        let unsupported = |kind: &str| {
            format!("{}: eval reads {{\"text\": ...}} or {{\"input_ids\": [...]}} rows; this is {kind}", at())
        };
        self.data.lines += 1;
        let (ids, labels) = match record {
            Record::Tokens { input_ids, labels } => {
                let labels = labels.unwrap_or_else(|| input_ids.clone());
                (input_ids, labels)
            }
            Record::Text(text) => {
                if self.tokenizer.is_none() {
                    let t = Tokenizer::load(self.model_dir)
                        .with_context(|| format!("{}: a text row needs the tokenizer", at()))?;
                    self.tokenizer = Some(t);
                }
                let t = self.tokenizer.as_ref().expect("loaded just above");
                let ids: Vec<i32> = t.encode(&text, true).with_context(at)?.into_iter().map(|id| id as i32).collect();
                (ids.clone(), ids)
            }
            Record::Chat(_) => bail!(unsupported("a chat (\"messages\") row")),
            Record::PromptCompletion { .. } => bail!(unsupported("a prompt/completion row")),
            Record::Instruction { .. } => bail!(unsupported("an instruction row")),
        };
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
            bail!("{}: token id {bad} is outside the model's vocabulary (0..{vocab})", at());
        }
        if let Some(bad) = labels.iter().find(|&&l| l != IGNORE_INDEX && (l < 0 || l as usize >= vocab)) {
            bail!("{}: label {bad} is neither -100 nor a token id of the vocabulary (0..{vocab})", at());
        }
        if labels.iter().skip(1).any(|&l| l != IGNORE_INDEX) {
            self.data.rows.push(Row { ids, labels });
        }
        Ok(())
    }
}

/// Consecutive rows grouped into batches of at most `budget` tokens; a row longer than that is a batch alone.
fn group(rows: &[Row], budget: usize) -> Vec<Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        if i > start && tokens + row.ids.len() > budget {
            groups.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += row.ids.len();
    }
    if start < rows.len() {
        groups.push(start..rows.len());
    }
    groups
}

/// Logits are formed this many elements at a time (64 MiB of f32): a [tokens, vocab] matrix never exists whole.
const LOGITS_CHUNK: usize = 1 << 24;

/// Σ NLL over the predicted tokens of one packed batch.
fn nll(model: &CausalLm, batch: &Batch) -> Result<f64> {
    let tape = Tape::new();
    let sum = tape.no_grad(|| -> qlora_runtime::Result<f64> {
        let h = model.forward_hidden(&tape, model.batch_ids(batch), &batch.positions, &batch.cu_seqlens, None, 0)?;
        let tokens = h.shape()[0];
        let chunk = (LOGITS_CHUNK / model.config.vocab_size.max(1)).max(1);
        let mut sum = 0.0;
        for start in (0..tokens).step_by(chunk) {
            let n = chunk.min(tokens - start);
            let logits = model.head(&tape, &Var::constant(h.value().narrow(0, start, n)?))?;
            let targets = batch.targets.narrow(0, start, n)?;
            sum += tape.cross_entropy(&logits, &targets, 1.0)?.value().to_scalar::<f64>()?;
        }
        Ok(sum)
    })?;
    Ok(sum)
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let format = args.load.base_format()?;
    if args.batch_tokens == 0 {
        bail!("--batch-tokens must be at least 1");
    }
    let model_dir = crate::model_path::resolve_model(&args.model)?;
    let config = ModelConfig::load(&model_dir)?;
    let data = read_data(&args.data, &model_dir, config.vocab_size)?;
    if data.rows.is_empty() {
        bail!(
            "{}: no row has a token to predict ({} rows read; a row needs at least 2 tokens and a label other than -100 after the first)",
            args.data.display(),
            data.lines
        );
    }
    let start = Instant::now();
    let mut base = CausalLm::load(&model_dir, format)?;
    let adapters = read_all(&args.adapter, &base)?;
    let (device, dtype) = args.load.placement()?;
    if device != Device::Cpu {
        base = base.to_device(device, dtype).with_context(|| format!("moving the model to {device}"))?;
    }
    let groups = group(&data.rows, args.batch_tokens);
    let batches = groups
        .iter()
        .map(|range| {
            let seqs: Vec<(Vec<i32>, Vec<i32>)> =
                data.rows[range.clone()].iter().map(|r| (r.ids.clone(), r.labels.clone())).collect();
            let batch = Batch::pack(&seqs)?;
            Ok((batch.trained_tokens(), batch.to_device(device)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let tokens: usize = batches.iter().map(|(n, _)| n).sum();
    if !args.json {
        let c = &base.config;
        println!("model {} ({:?}, {} layers)", args.model.display(), c.family, c.num_hidden_layers);
        println!(
            "data  {}: {} rows scored of {}, {} batches",
            args.data.display(),
            data.rows.len(),
            data.lines,
            groups.len()
        );
    }
    // The plain base when no adapter is given; otherwise each adapter in turn over the one base (dropout off, as
    // peft's eval mode).
    let runs: Vec<Option<&crate::named_adapters::NamedAdapter>> =
        if adapters.is_empty() { vec![None] } else { adapters.iter().map(Some).collect() };
    for named in runs {
        let model = base.with_adapter(named.map(|a| &a.adapter))?;
        let mut sum = 0.0;
        for (b, (_, batch)) in batches.iter().enumerate() {
            sum += nll(&model, batch).with_context(|| format!("batch {} of {}", b + 1, groups.len()))?;
        }
        let loss = sum / tokens as f64;
        let seconds = start.elapsed().as_secs_f64();
        if args.json {
            let out = serde_json::json!({
                "loss": loss,
                "perplexity": loss.exp(),
                "tokens": tokens,
                "rows": data.rows.len(),
                "batches": groups.len(),
                "seconds": seconds,
                "model": args.model.display().to_string(),
                "adapter": named.map(|a| a.arg.dir.display().to_string()),
                "adapter_name": named.map(|a| &a.name),
                "data": args.data.display().to_string(),
            });
            println!("{out}");
        } else {
            let label = match named {
                Some(a) => format!("adapter {} ({} modules): ", a.name, a.adapter.len()),
                None => String::new(),
            };
            println!(
                "{label}loss {loss:.6}  perplexity {:.4}  over {tokens} predicted tokens ({seconds:.1}s)",
                loss.exp()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_fill_the_budget_in_order() {
        let rows: Vec<Row> = [3, 4, 2, 9, 1].iter().map(|&n| Row { ids: vec![0; n], labels: vec![0; n] }).collect();
        assert_eq!(group(&rows, 7), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(group(&rows, 100), vec![0..5]);
        assert_eq!(group(&rows, 1), vec![0..1, 1..2, 2..3, 3..4, 4..5]);
    }
}
