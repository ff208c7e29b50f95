//! `generate --prompts FILE.jsonl`: many prompts, each with its own adapter, over one base loaded once.
//!
//! Prompts are grouped by adapter; each adapter is folded into its own dense copy of the base when its group
//! starts, and that copy is dropped when the group ends. Measured on SmolLM2-135M (2 CPU cores): folding costs
//! 1.1 s, as much as dequantizing the NF4 base once, which the other fast choice (one dense base shared by
//! adapters applied unmerged) pays too; a folded copy then generates as fast as the plain model (32 tokens/s),
//! the shared base with unmerged adapters 10-20% slower (25-30), and the NF4 base with unmerged adapters 10x slower
//! (3.3). Memory is the same for both fast choices (one dense copy besides the NF4 base). Folding also makes each
//! completion bit for bit the one a run with that adapter alone gives, since that run folds it the same way.
//!
//! Output lines keep the input order: each is written as soon as every line before it is done.

use super::prompt::{Encoded, Prompter};
use crate::named_adapters::{AdapterArg, NamedAdapter};
use anyhow::{anyhow, bail, Context, Result};
use qlora_models::adapters::ModelAdapter;
use qlora_models::data::jsonl::{parse_record, Record};
use qlora_models::formats::tokenizer::Tokenizer;
use qlora_models::generate::{generate, GenerateOptions, StopReason};
use qlora_models::transformer::CausalLm;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

/// One line of the prompts file, ready to run.
pub struct Job {
    /// `FILE: line N`, for errors.
    at: String,
    /// Index into the `--adapter` list; None runs the base alone.
    adapter: Option<usize>,
    prompt: Encoded,
}

/// Reads and tokenizes every line (blank lines are skipped); errors name the file and line.
pub fn read(path: &Path, adapters: &[AdapterArg], prompter: &Prompter) -> Result<Vec<Job>> {
    let file = std::fs::File::open(path).with_context(|| format!("--prompts {}", path.display()))?;
    let names: Vec<String> = adapters.iter().map(AdapterArg::label).collect();
    // A line without "adapter" uses the only adapter, or the base when there are none or several to choose from.
    let default = (adapters.len() == 1).then_some(0);
    let mut jobs = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let at = format!("{}: line {}", path.display(), i + 1);
        let line = line.with_context(|| at.clone())?;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(&line).map_err(|e| anyhow!("{at}: invalid JSON at column {}: {e}", e.column()))?;
        let Value::Object(fields) = &value else { bail!("{at}: expected a JSON object") };
        let adapter = match fields.get("adapter") {
            None => default,
            Some(Value::Null) => None,
            Some(Value::String(name)) => match names.iter().position(|n| n == name) {
                Some(i) => Some(i),
                None if names.is_empty() => bail!("{at}: adapter {name:?} is named, but no --adapter is given"),
                None => bail!("{at}: no adapter named {name:?} (--adapter gives {})", names.join(", ")),
            },
            Some(_) => bail!("{at}: \"adapter\" must be the name of an --adapter, or null for the base"),
        };
        let prompt = match (fields.get("prompt"), fields.get("messages")) {
            (Some(_), Some(_)) => bail!("{at}: give \"prompt\" or \"messages\", not both"),
            (Some(Value::String(text)), None) => prompter.raw(text),
            (Some(_), None) => bail!("{at}: \"prompt\" must be a string"),
            (None, Some(_)) => match parse_record(&value).map_err(|e| anyhow!("{at}: {e}"))? {
                Record::Chat(messages) => prompter.chat(&messages),
                _ => unreachable!("parse_record reads a \"messages\" field as a chat"),
            },
            (None, None) => bail!("{at}: expected {{\"prompt\": TEXT}} or {{\"messages\": [...]}}"),
        }
        .with_context(|| at.clone())?;
        jobs.push(Job { at, adapter, prompt });
    }
    if jobs.is_empty() {
        bail!("--prompts {}: no prompt in the file", path.display());
    }
    Ok(jobs)
}

/// Runs every job on the model `prepare` makes of the base with its adapter (once per adapter) and writes its JSON
/// line to `out` (`out_path` names it in errors; None is stdout).
pub fn serve(
    adapters: &[NamedAdapter],
    jobs: &[Job],
    tokenizer: &Tokenizer,
    options: impl Fn(Vec<u32>) -> GenerateOptions,
    mut out: Box<dyn Write>,
    out_path: Option<&Path>,
    prepare: impl Fn(Option<&ModelAdapter>) -> Result<CausalLm>,
) -> Result<()> {
    let target = || out_path.map_or("stdout".into(), |p| p.display().to_string());
    let mut groups: Vec<Option<usize>> = Vec::new();
    for job in jobs {
        if !groups.contains(&job.adapter) {
            groups.push(job.adapter);
        }
    }
    let mut lines: Vec<Option<String>> = vec![None; jobs.len()];
    let (mut written, mut tokens) = (0, 0);
    let start = Instant::now();
    for group in groups {
        let adapter = group.map(|i| &adapters[i]);
        let model = prepare(adapter.map(|a| &a.adapter))?;
        for (k, job) in jobs.iter().enumerate().filter(|(_, j)| j.adapter == group) {
            let options = options(job.prompt.stop_tokens.clone());
            let generation = generate(&model, &job.prompt.ids, &options, |_| ControlFlow::Continue(()))
                .with_context(|| job.at.clone())?;
            tokens += generation.tokens.len();
            let completion = tokenizer.decode(&generation.tokens, true).with_context(|| job.at.clone())?;
            let line = json!({
                "adapter": adapter.map(|a| &a.name),
                "completion": completion,
                "tokens": generation.tokens.len(),
                "stop": stop_name(generation.stop),
            });
            lines[k] = Some(line.to_string());
            while let Some(line) = lines.get_mut(written).and_then(Option::take) {
                writeln!(out, "{line}").with_context(|| format!("writing {}", target()))?;
                written += 1;
            }
            out.flush().with_context(|| format!("writing {}", target()))?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "qlora-rt: {} prompt(s), {tokens} token(s) in {secs:.1}s ({:.1} tokens/s) to {}",
        jobs.len(),
        tokens as f64 / secs.max(1e-9),
        target()
    );
    Ok(())
}

/// Why a completion stopped, for programs.
fn stop_name(stop: StopReason) -> &'static str {
    match stop {
        StopReason::StopToken(_) => "stop_token",
        StopReason::MaxNewTokens => "max_new_tokens",
        StopReason::ContextFull => "context_full",
        StopReason::Cancelled => "cancelled",
    }
}
