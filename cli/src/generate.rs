//! `qlora-rt generate`: text from a model, optionally with a PEFT adapter on top, streamed to stdout token by
//! token. `--prompt` continues raw text; `--chat` renders a one-turn conversation (after `--system`, if given)
//! through the chat template with the assistant's turn opened, and stops at the end of that turn.
//! Everything that is not generated text (load notes, the speed line) goes to stderr.

use crate::eval::Quantize;
use crate::finetune::TemplateArg;
use anyhow::{anyhow, bail, ensure, Context, Result};
use qlora_models::data::jsonl::Message;
use qlora_models::data::template::ChatTemplate;
use qlora_models::formats::peft::load_adapter;
use qlora_models::formats::tokenizer::Tokenizer;
use qlora_models::generate::{generate, GenerateOptions, Sampling, StopReason};
use qlora_models::transformer::CausalLm;
use qlora_runtime::DType;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

/// End-of-turn tokens of the common chat formats (ChatML, Llama 3, Gemma): a chat reply stops at whichever the
/// vocabulary has, even when generation_config.json lists only the plain EOS.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>"];

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "chat"])))]
pub struct GenerateArgs {
    /// Hugging Face model folder (config.json, safetensors weights, tokenizer.json) or a .gguf file (imported
    /// once into the qlora-rt cache).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a finetune --out.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Raw text to continue (BOS added as the tokenizer's config says).
    #[arg(long, value_name = "TEXT")]
    prompt: Option<String>,
    /// A user message, rendered with the chat template; the reply ends at the end of the assistant's turn.
    #[arg(long, value_name = "TEXT")]
    chat: Option<String>,
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
    #[arg(long, value_enum)]
    quantize: Option<Quantize>,
    /// With nf4: keep the block scales in f32 (for adapters trained with finetune --no-double-quant).
    #[arg(long)]
    no_double_quant: bool,
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
    ensure!(args.system.is_none() || args.chat.is_some(), "--system goes with --chat, not --prompt");
    let sampling = args.sampling()?;
    let model_dir = crate::model_path::resolve_model(&args.model)?;
    let tokenizer = Tokenizer::load(&model_dir)?;
    let mut stop_tokens = tokenizer.stop_ids();
    stop_tokens.extend(tokenizer.eos.as_ref().map(|t| t.id));
    let prompt = match (&args.prompt, &args.chat) {
        (Some(text), _) => tokenizer.encode(text, true)?,
        (None, Some(user)) => {
            let text = |t: &Option<qlora_models::formats::tokenizer::SpecialToken>| {
                t.as_ref().map(|t| t.text.clone()).unwrap_or_default()
            };
            let (bos, eos) = (text(&tokenizer.bos), text(&tokenizer.eos));
            let template = match (args.chat_template, &tokenizer.chat_template) {
                (Some(t), _) => ChatTemplate::builtin(t.builtin(), &bos, &eos),
                (None, Some(src)) => {
                    ChatTemplate::new(src, &bos, &eos).map_err(|e| anyhow!("{}: {e}", model_dir.display()))?
                }
                (None, None) => bail!(
                    "{} has no chat template; pass --chat-template (llama3, llama2, gemma or chatml) or use --prompt",
                    model_dir.display()
                ),
            };
            let mut messages: Vec<Message> =
                args.system.iter().map(|s| Message { role: "system".into(), content: s.clone() }).collect();
            messages.push(Message { role: "user".into(), content: user.clone() });
            let rendered = template.render(&messages, true).map_err(|e| anyhow!(e))?;
            stop_tokens.extend(END_OF_TURN.iter().filter_map(|t| tokenizer.token_to_id(t)));
            // The template writes BOS itself.
            tokenizer.encode(&rendered, false)?
        }
        (None, None) => bail!("give --prompt or --chat"),
    };
    stop_tokens.sort();
    stop_tokens.dedup();

    let quantize = args.quantize.unwrap_or(if args.adapter.is_some() { Quantize::Nf4 } else { Quantize::None });
    let load_start = Instant::now();
    let mut model = CausalLm::load(&model_dir, quantize.base_format(!args.no_double_quant, DType::F32))?;
    if let Some(dir) = &args.adapter {
        let n = load_adapter(&mut model, dir)?;
        // Inference: peft's eval mode, no adapter dropout.
        for proj in model.projections_mut()? {
            proj.adapter = proj.adapter.take().map(|a| a.without_dropout());
        }
        eprintln!("qlora-rt: adapter {} on {n} projection(s)", dir.display());
    }
    eprintln!("qlora-rt: model loaded in {:.1}s", load_start.elapsed().as_secs_f64());

    let options = GenerateOptions { max_new_tokens: args.max_new_tokens, sampling, stop_tokens };
    let mut stream = Stream { tokenizer: &tokenizer, tokens: Vec::new(), printed: 0 };
    let mut failed = None;
    let start = Instant::now();
    let generation = generate(&model, &prompt, &options, |token| match stream.push(token) {
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
    let stop = match generation.stop {
        StopReason::StopToken(id) => format!("stop token {}", tokenizer.id_to_token(id).unwrap_or_default()),
        StopReason::MaxNewTokens => "--max-new-tokens".into(),
        StopReason::ContextFull => "the model's context length".into(),
        StopReason::Cancelled => "cancelled".into(),
    };
    eprintln!(
        "qlora-rt: {} token(s) in {secs:.1}s ({:.1} tokens/s); stopped at {stop}",
        generation.tokens.len(),
        generation.tokens.len() as f64 / secs.max(1e-9),
    );
    Ok(())
}
