//! `qlora-rt inspect DIR`: what a model folder or a PEFT adapter folder holds, read from its config and the
//! safetensors headers only (no weight is loaded): architecture and shapes, parameter counts, stored dtypes,
//! bitsandbytes quantization, and the weight memory it needs in bf16, NF4 and NF4 with double quantization.

use anyhow::{bail, Context, Result};
use qlora_models::config::{projection_kinds, LayerKind};
use qlora_models::formats::bnb::{is_decoder_linear, QuantState};
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::peft::{AdapterConfig, KEY_PREFIX};
use qlora_models::ModelConfig;
use qlora_runtime::nf4::{nf4_num_blocks, nf4_packed_len, DEFAULT_BLOCKSIZE, NESTED_BLOCKSIZE};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// A model folder (config.json + safetensors) or a PEFT adapter folder (adapter_config.json +
    /// adapter_model.safetensors), or a .gguf model file (imported once into the qlora-rt cache).
    dir: PathBuf,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let dir = &crate::model_path::resolve_model(&args.dir)?;
    let (model, adapter) = (dir.join("config.json").exists(), dir.join("adapter_config.json").exists());
    if !model && !adapter {
        bail!(
            "{}: neither a model folder (config.json) nor a PEFT adapter folder (adapter_config.json)",
            dir.display()
        );
    }
    if model {
        print!("{}", model_report(dir)?);
    }
    if adapter {
        print!("{}", adapter_report(dir)?);
    }
    Ok(())
}

/// 1234567 → "1,234,567".
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// "F32 ×23, U8 ×14" in a stable order.
fn dtype_list(counts: &BTreeMap<String, usize>) -> String {
    counts.iter().map(|(d, n)| format!("{d} ×{n}")).collect::<Vec<_>>().join(", ")
}

/// The tensors bitsandbytes stores beside a 4-bit `{module}.weight`; they belong to that weight.
const BNB_PARTS: [&str; 6] = [
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state.bitsandbytes__nf4",
    ".quant_state.bitsandbytes__fp4",
];

/// Parameter counts of a model checkpoint, a 4-bit weight counted by its quant state's shape.
#[derive(Default)]
struct Counts {
    total: usize,
    /// Decoder projections: what QLoRA stores in NF4.
    linear: usize,
    /// NF4 bytes of the linears without / with double quantization, at the default block size.
    nf4_bytes: usize,
    nf4_dq_bytes: usize,
    embeddings: usize,
    lm_head: usize,
    /// Stored dtype → tensor count ("NF4" for bitsandbytes 4-bit weights).
    dtypes: BTreeMap<String, usize>,
    stored_4bit: usize,
}

fn count(ck: &Checkpoint) -> Result<Counts> {
    let mut c = Counts::default();
    for name in ck.names() {
        let is_part = BNB_PARTS
            .iter()
            .any(|p| name.strip_suffix(p).is_some_and(|w| ck.contains(&format!("{w}.quant_state.bitsandbytes__nf4"))));
        if is_part {
            continue;
        }
        let state = format!("{name}.quant_state.bitsandbytes__nf4");
        let (dtype, shape) = if ck.contains(&state) {
            let qs = QuantState::parse(ck.bytes(&state)?).map_err(|msg| ck.tensor_error(&state, msg))?;
            c.stored_4bit += 1;
            ("NF4".to_string(), qs.shape)
        } else {
            ck.info(name)?
        };
        let n: usize = shape.iter().product();
        *c.dtypes.entry(dtype).or_default() += 1;
        c.total += n;
        if is_decoder_linear(name) {
            let blocks = nf4_num_blocks(n, DEFAULT_BLOCKSIZE);
            c.linear += n;
            c.nf4_bytes += nf4_packed_len(n) + 4 * blocks;
            // 8-bit codes per block, an f32 scale per 256 blocks, one f32 offset (FORMATS.md).
            c.nf4_dq_bytes += nf4_packed_len(n) + blocks + 4 * blocks.div_ceil(NESTED_BLOCKSIZE) + 4;
        } else if name == "model.embed_tokens.weight" {
            c.embeddings += n;
        } else if name == "lm_head.weight" {
            c.lm_head += n;
        }
    }
    Ok(c)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// The bitsandbytes settings of config.json's quantization_config, or "no".
fn quantization(config: &Value) -> String {
    let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else { return "no".into() };
    let s = |k: &str| q.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let b = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    match s("quant_method").as_str() {
        "bitsandbytes" if b("load_in_4bit") => format!(
            "bitsandbytes 4-bit {}, double quant {}, compute dtype {}",
            s("bnb_4bit_quant_type"),
            if b("bnb_4bit_use_double_quant") { "on" } else { "off" },
            s("bnb_4bit_compute_dtype")
        ),
        "bitsandbytes" if b("load_in_8bit") => "bitsandbytes 8-bit (LLM.int8; not supported by qlora-rt)".into(),
        other => format!("{other} (not supported by qlora-rt)"),
    }
}

fn model_report(dir: &Path) -> Result<String> {
    let config = ModelConfig::load(dir)?;
    let raw = read_json(&dir.join("config.json"))?;
    let ck = Checkpoint::open(dir)?;
    let n = count(&ck)?;
    let c = &config;
    let arch = raw.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str).unwrap_or("(not recorded)");
    let sliding = c.layer_kinds.iter().filter(|&&k| k == LayerKind::Sliding).count();
    let layers = match (sliding, c.sliding_window) {
        (0, _) | (_, None) => format!("{} (full attention)", c.num_hidden_layers),
        (s, Some(w)) => format!("{} ({s} sliding window {w}, {} full)", c.num_hidden_layers, c.num_hidden_layers - s),
    };
    let other = n.total - n.linear;
    let mut quantized = quantization(&raw);
    if n.stored_4bit > 0 {
        quantized += &format!(" ({} linears stored 4-bit)", n.stored_4bit);
    }
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13}{v}\n"));
    line("model", dir.display().to_string());
    line("architecture", format!("{arch} ({:?})", c.family));
    line("layers", layers);
    line("hidden", format!("{}, intermediate {}, vocab {}", c.hidden_size, c.intermediate_size, c.vocab_size));
    line(
        "attention",
        format!("{} heads, {} KV heads, head_dim {}", c.num_attention_heads, c.num_key_value_heads, c.head_dim),
    );
    line(
        "parameters",
        format!(
            "{} total: {} linear (decoder projections), {} embeddings, {} lm_head{}",
            grouped(n.total),
            grouped(n.linear),
            grouped(n.embeddings),
            grouped(n.lm_head),
            if c.tie_word_embeddings && n.lm_head == 0 { " (tied)" } else { "" }
        ),
    );
    line("tensors", format!("{}: {}", n.dtypes.values().sum::<usize>(), dtype_list(&n.dtypes)));
    line("quantized", quantized);
    line(
        "memory",
        format!(
            "weights in bf16 {}, NF4 {}, NF4+DQ {} (linears 4-bit at block {DEFAULT_BLOCKSIZE}, the rest bf16)",
            bytes(2 * n.total),
            bytes(n.nf4_bytes + 2 * other),
            bytes(n.nf4_dq_bytes + 2 * other)
        ),
    );
    Ok(out)
}

fn adapter_report(dir: &Path) -> Result<String> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("{}", cfg_path.display()))?;
    let cfg = AdapterConfig::parse(&text, &cfg_path)?;
    let raw = read_json(&cfg_path)?;
    let ck = Checkpoint::from_files(&[dir.join("adapter_model.safetensors")])?;
    let (mut params, mut dtypes) = (0usize, BTreeMap::<String, usize>::new());
    // Adapted modules, and their kinds (q_proj, ...).
    let (mut modules, mut kinds) = (Vec::<String>::new(), Vec::<String>::new());
    for name in ck.names() {
        let (dtype, shape) = ck.info(name)?;
        params += shape.iter().product::<usize>();
        *dtypes.entry(dtype).or_default() += 1;
        let module = name.strip_prefix(KEY_PREFIX).unwrap_or(name);
        let Some(module) = module.split(".lora_").next().filter(|m| *m != module) else { continue };
        if !modules.iter().any(|m| m == module) {
            modules.push(module.to_string());
            let kind = module.rsplit('.').next().unwrap_or(module).to_string();
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
    }
    // transformers' module order, unknown kinds last.
    let order = projection_kinds();
    kinds.sort_by_key(|k| order.iter().position(|o| o == k).unwrap_or(order.len()));
    let variant = match (cfg.use_dora, cfg.use_rslora) {
        (true, true) => "DoRA, rsLoRA scaling",
        (true, false) => "DoRA",
        (false, true) => "LoRA, rsLoRA scaling",
        (false, false) => "LoRA",
    };
    let scaling = if cfg.use_rslora { cfg.lora_alpha / (cfg.r as f64).sqrt() } else { cfg.lora_alpha / cfg.r as f64 };
    let mut rank = format!("r {}, alpha {} (scaling {scaling}), dropout {}", cfg.r, cfg.lora_alpha, cfg.lora_dropout);
    if !cfg.rank_pattern.is_empty() || !cfg.alpha_pattern.is_empty() {
        rank += &format!("; per-module overrides: {} rank, {} alpha", cfg.rank_pattern.len(), cfg.alpha_pattern.len());
    }
    let base = raw.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("(not recorded)");
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13}{v}\n"));
    line("adapter", dir.display().to_string());
    line("type", variant.into());
    line("rank", rank);
    line("targets", format!("{} ({} modules)", kinds.join(", "), modules.len()));
    line("base model", base.into());
    line("tensors", format!("{}: {}", dtypes.values().sum::<usize>(), dtype_list(&dtypes)));
    line("trainable", format!("{} parameters", grouped(params)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_well() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1234567), "1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.50 MiB");
    }
}
