//! `qlora-rt generate`: text from a model, optionally with a PEFT adapter on top, streamed to stdout token by
//! token. `--prompt` continues raw text; `--chat` renders a one-turn conversation (after `--system`, if given)
//! through the chat template with the assistant's turn opened, and stops at the end of that turn; `--prompts`
//! serves a JSONL file of prompts, each with the adapter it names, over one base (`prompts.rs`).
//! Everything that is not generated text (load notes, the speed line) goes to stderr.
//!
//! On the CPU the adapter is folded into the dequantized NF4 weights once at load ([`CausalLm::fold_adapters`], the
//! fold `qlora-rt merge` writes), so every token runs dense f32 products: unfolded, each token would dequantize the
//! whole NF4 base again and add the adapter's products: on SmolLM2-135M (2 CPU cores) 2.6 tokens/s unfolded against
//! 15 without an adapter, and as fast with as without once folded. Without an adapter the base is dense as stored
//! (or, with `--quantize nf4`, dequantized once by the same fold), so no CPU path dequantizes per token. On a GPU
//! (`--device cuda`, or `auto` when one is usable) the model and its KV cache live there in `--dtype`; an NF4 base
//! stays packed with the adapter unmerged, and each decoding step reads it through the NF4 GEMV (4 bits per weight
//! per token, never dequantized whole); `--merge` folds as on the CPU.

mod prompt;
mod prompts;

use crate::device::DeviceArg;
use crate::eval::{DtypeArg, Quantize};
use crate::finetune::TemplateArg;
use crate::named_adapters::{read_all, AdapterArg};
use anyhow::{bail, ensure, Context, Result};
use prompt::Prompter;
use qlora_models::adapters::ModelAdapter;
use qlora_models::data::jsonl::Message;
use qlora_models::formats::tokenizer::Tokenizer;
use qlora_models::generate::{generate, GenerateOptions, Sampling, StopReason};
use qlora_models::transformer::CausalLm;
use qlora_runtime::{DType, Device};
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat", "prompts"])))]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors weights, tokenizer.json) or a .gguf file (imported
    /// once into the qlora-rt cache).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a finetune --out, as DIR or
    /// NAME=DIR. Repeat it to serve several adapters over one base with --prompts, each named.
    #[arg(long, value_name = "[NAME=]DIR")]
    adapter: Vec<AdapterArg>,
    /// Raw text to continue (BOS added as the tokenizer's config says).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// A user message, rendered with the chat template; the reply ends at the end of the assistant's turn.
    #[arg(long, value_name = "TEXT")]
    chat: Option<String>,
    /// JSONL file, one prompt per line: {"prompt": TEXT} (raw text to continue) or {"messages": [...]} (a chat,
    /// the reply ending at the end of the assistant's turn), with an optional "adapter": the NAME of an
    /// --adapter, or null for the base alone. A line without one uses the adapter when exactly one is given, else
    /// the base. Writes one JSON line per prompt, in order: {"adapter", "completion", "tokens", "stop"}.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// With --prompts: write the JSON lines to FILE instead of stdout.
    #[arg(long, value_name = "FILE", requires = "prompts")]
    out: Option<PathBuf>,
    /// System message before --chat.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Chat template to use instead of the tokenizer's own.
    #[arg(long, value_enum)]
    chat_template: Option<TemplateArg>,
    /// Stop after this many new tokens.
    #[arg(long, value_name = "N", default_value_t = 256)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time (greedy).
    #[arg(long, value_name = "T", default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the K most likely tokens (needs --temperature > 0).
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P (needs --temperature > 0).
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// Seed of the sampling stream.
    #[arg(long, value_name = "S", default_value_t = 42)]
    seed: u64,
    /// Base weights: nf4 (what QLoRA adapters were trained against) or none (f32). Default: nf4 with --adapter,
    /// none without — a merged model's small adapter updates would be rounded away by quantizing it again.
    /// Either way generation runs dense f32 products: NF4 weights are dequantized once, at load.
    #[arg(long, value_enum)]
    quantize: Option<Quantize>,
    /// With nf4: keep the block scales in f32 (for adapters trained with finetune --no-double-quant).
    #[arg(long)]
    no_double_quant: bool,
    /// Where to generate: auto (the GPU when one can be opened, else the CPU; a note says which), cpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Compute precision on a GPU (the CPU computes in f32): bf16, or f32 for results closest to the CPU's.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    dtype: DtypeArg,
    /// On a GPU, fold the adapter into dense weights at load (as on the CPU) instead of keeping the NF4 base packed
    /// with the adapter beside it (each token then reads 4-bit weights through the NF4 GEMV, plus two thin
    /// products per adapted projection).
    #[arg(long)]
    merge: bool,
}

impl GenerateArgs {
    fn sampling(&self) -> Result<Sampling> {
        let t = self.temperature;
        ensure!(t.is_finite() && t >= 0.0, "--temperature must be 0 (greedy) or a positive number, got {t}");
        if t == 0.0 {
            ensure!(
                self.top_k.is_none() && self.top_p.is_none(),
                "--top-k and --top-p need --temperature > 0 (0 is greedy)"
            );
            return Ok(Sampling::Greedy);
        }
        Ok(Sampling::Random { temperature: t, top_k: self.top_k, top_p: self.top_p, seed: self.seed })
    }
}

/// Prints the decoded text as it grows. Tokens are decoded together, not one by one, because a token may be
/// half a UTF-8 character or carry a word-initial space that only the whole sequence decodes right.
struct Stream<'a> {
    tokenizer: &'a Tokenizer,
    tokens: Vec<u32>,
    printed: usize,
}

impl Stream<'_> {
    fn push(&mut self, token: u32) -> Result<()> {
        self.tokens.push(token);
        let text = self.tokenizer.decode(&self.tokens, true)?;
        // A trailing U+FFFD is an incomplete character: wait for the rest of its bytes.
        if text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        if let Some(new) = text.get(self.printed..) {
            let mut out = std::io::stdout().lock();
            out.write_all(new.as_bytes()).and_then(|()| out.flush()).context("writing to stdout")?;
            self.printed = text.len();
        }
        Ok(())
    }
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    ensure!(args.system.is_none() || args.chat.is_some(), "--system goes with --chat, not --prompt or --prompts");
    if args.adapter.len() > 1 && args.prompts.is_none() {
        bail!(
            "--adapter given {} times: serving several adapters needs --prompts (each line names its adapter)",
            args.adapter.len()
        );
    }
    let sampling = args.sampling()?;
    let model_dir = crate::model_path::resolve_model(&args.model)?;
    let tokenizer = Tokenizer::load(&model_dir)?;
    let prompter = Prompter::new(&tokenizer, &model_dir, args.chat_template);
    // Every prompt is read and checked before the model loads, so a bad line costs no load time.
    let jobs = match &args.prompts {
        Some(path) => Some(prompts::read(path, &args.adapter, &prompter)?),
        None => None,
    };
    let single = match (&args.prompt, &args.chat) {
        (Some(text), _) => Some(prompter.raw(text)?),
        (None, Some(user)) => {
            let mut messages: Vec<Message> =
                args.system.iter().map(|s| Message { role: "system".into(), content: s.clone() }).collect();
            messages.push(Message { role: "user".into(), content: user.clone() });
            Some(prompter.chat(&messages)?)
        }
        (None, None) => None,
    };

    let quantize = args.quantize.unwrap_or(if args.adapter.is_empty() { Quantize::None } else { Quantize::Nf4 });
    let load_start = Instant::now();
    let base = CausalLm::load(&model_dir, quantize.base_format(!args.no_double_quant, DType::F32))?;
    let adapters = read_all(&args.adapter, &base)?;
    for a in &adapters {
        let n = a.adapter.len();
        eprintln!("qlora-rt: adapter {} ({}) on {n} projection(s)", a.name, a.arg.dir.display());
    }
    eprintln!("qlora-rt: model loaded in {:.1}s", load_start.elapsed().as_secs_f64());
    // Picked once everything given has been read and checked, so a bad input is one error line.
    let placement = crate::device::pick(args.device, args.dtype.dtype(), "generating")?;
    let options = |stop_tokens: Vec<u32>| GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: sampling.clone(),
        stop_tokens,
    };
    if let Some(jobs) = jobs {
        let out: Box<dyn Write> = match &args.out {
            Some(path) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
            )),
            None => Box::new(std::io::stdout().lock()),
        };
        let prepare = |adapter: Option<&ModelAdapter>| prepare(&base, adapter, placement, args.merge);
        return prompts::serve(&adapters, &jobs, &tokenizer, options, out, args.out.as_deref(), prepare);
    }
    let Some(prompt) = single else { bail!("give --prompt, --chat or --prompts") };
    let model = prepare(&base, adapters.first().map(|a| &a.adapter), placement, args.merge)?;
    // The NF4 base is not needed once folded.
    drop(base);

    let mut stream = Stream { tokenizer: &tokenizer, tokens: Vec::new(), printed: 0 };
    let mut failed = None;
    let start = Instant::now();
    let generation = generate(&model, &prompt.ids, &options(prompt.stop_tokens), |token| match stream.push(token) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            failed = Some(e);
            ControlFlow::Break(())
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    println!();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "qlora-rt: {} token(s) in {secs:.1}s ({:.1} tokens/s); stopped at {}",
        generation.tokens.len(),
        generation.tokens.len() as f64 / secs.max(1e-9),
        stop_reason(&tokenizer, generation.stop),
    );
    Ok(())
}

/// The model that generates with `adapter` (None: the base alone) where `placement` says: [`place`]d.
fn prepare(
    base: &CausalLm,
    adapter: Option<&ModelAdapter>,
    placement: (Device, DType),
    merge: bool,
) -> Result<CausalLm> {
    place(base.with_adapter(adapter)?, placement, merge)
}

/// A model with its adapters attached, made ready to generate where `placement` says. On the CPU the adapters are
/// folded into dense f32 weights (the fastest there, see the module docs). On a GPU the base keeps its format with
/// the adapters unmerged (an NF4 base then decodes through the NF4 GEMV, reading 4 bits per weight per token),
/// unless `merge` folds them as on the CPU; the copy there computes in the placement's dtype.
pub(crate) fn place(adapted: CausalLm, (device, dtype): (Device, DType), merge: bool) -> Result<CausalLm> {
    if device == Device::Cpu {
        return Ok(adapted.fold_adapters()?);
    }
    let model = if merge { adapted.fold_adapters()? } else { adapted };
    model.to_device(device, dtype).with_context(|| format!("moving the model to {device}"))
}

/// Why generation stopped, for people.
fn stop_reason(tokenizer: &Tokenizer, stop: StopReason) -> String {
    match stop {
        StopReason::StopToken(id) => format!("stop token {}", tokenizer.id_to_token(id).unwrap_or_default()),
        StopReason::MaxNewTokens => "--max-new-tokens".into(),
        StopReason::ContextFull => "the model's context length".into(),
        StopReason::Cancelled => "cancelled".into(),
    }
}
