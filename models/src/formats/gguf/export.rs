//! A Hugging Face model folder (plain, or 4-bit as bitsandbytes saves it) → one GGUF v3 file that llama.cpp
//! loads: the inverse of [`super::HfImport`]. Keys, tensor names and transforms are `convert_hf_to_gguf.py`'s
//! (`LlamaModel`, `GemmaModel`, `Gemma2Model`, `Gemma3Model` and `TextModel.set_gguf_parameters`):
//! - norms and other 1-D tensors F32, matrices in the types [`super::ftype`] chooses for the file type (for the
//!   quantized ones llama-quantize's mix); `output.weight` only when the embeddings are untied;
//! - Llama q/k rows permuted for llama.cpp's rope ([`super::mapping::permute_rows`]), Gemma norms stored
//!   as w + 1, Llama 3 rope scaling as a `rope_freqs.weight` tensor of per-frequency divisors;
//! - `general.name` from config.json's `_name_or_path` (which `import` fills from the GGUF's `general.name`),
//!   else the caller's name;
//! - two keys llama.cpp's converter does not write (both are keys llama.cpp's loader knows), so that the file says everything the model needs:
//!   Gemma 2/3's `attention.sliding_window_pattern` per layer (llama.cpp's loader may use its fixed pattern
//!   instead, which every released Gemma follows) and `attention.scale` = query_pre_attn_scalar^−½ (llama.cpp
//!   derives the scale from the head size, which equals it for every released Gemma but the 27B models, where
//!   llama.cpp special-cases them).

use super::dequant::GgmlType;
use super::ftype::{FileType, MixModel};
use super::hf_vocab;
use super::mapping::{ExportTensor, Hyper};
use super::metadata::{MetaArray, MetaValue};
use super::quant::quantize;
use super::writer::{self, TensorEntry, ALIGNMENT};
use crate::config::{Family, LayerKind, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::formats::bnb;
use crate::formats::checkpoint::Checkpoint;
use qlora_runtime::DType;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

/// llama.cpp's architecture name.
pub fn arch_name(family: Family) -> &'static str {
    match family {
        Family::Llama => "llama",
        Family::Gemma => "gemma",
        Family::Gemma2 => "gemma2",
        Family::Gemma3 => "gemma3",
    }
}

/// Llama 3 rope scaling as llama.cpp stores it (`LlamaModel.generate_extra_tensors`): for each rotary
/// frequency, the divisor that turns the unscaled frequency into the scaled one.
fn llama3_rope_factors(theta: f64, head_dim: usize, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32) as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// GGUF key/values in file order.
type Metadata = Vec<(String, MetaValue)>;

/// The model metadata keys (everything but the tokenizer) and the rope_freqs tensor, if any.
fn model_metadata(c: &ModelConfig, path: &Path, name: &str, ft: FileType) -> Result<(Metadata, Option<Vec<f32>>)> {
    let arch = arch_name(c.family);
    let bad = |field: &str, msg: String| Error::config(path, field, msg);
    if c.attention_bias || c.mlp_bias {
        return Err(bad("attention_bias", "bias tensors have no place in llama.cpp's llama/gemma layouts".into()));
    }
    let mut md: Metadata = Vec::new();
    let mut put = |k: &str, v: MetaValue| md.push((k.to_string(), v));
    let key = |k: &str| format!("{arch}.{k}");
    let u32_of =
        |field: &str, v: usize| u32::try_from(v).map_err(|_| bad(field, format!("{v} does not fit GGUF's u32")));
    put("general.architecture", MetaValue::Str(arch.into()));
    put("general.name", MetaValue::Str(name.into()));
    put("general.alignment", MetaValue::U32(ALIGNMENT as u32));
    put("general.file_type", MetaValue::U32(ft.id()));
    put("general.quantization_version", MetaValue::U32(2));
    put(&key("context_length"), MetaValue::U32(u32_of("max_position_embeddings", c.max_position_embeddings)?));
    put(&key("embedding_length"), MetaValue::U32(u32_of("hidden_size", c.hidden_size)?));
    put(&key("block_count"), MetaValue::U32(u32_of("num_hidden_layers", c.num_hidden_layers)?));
    put(&key("feed_forward_length"), MetaValue::U32(u32_of("intermediate_size", c.intermediate_size)?));
    put(&key("attention.head_count"), MetaValue::U32(u32_of("num_attention_heads", c.num_attention_heads)?));
    put(&key("attention.head_count_kv"), MetaValue::U32(u32_of("num_key_value_heads", c.num_key_value_heads)?));
    put(&key("attention.layer_norm_rms_epsilon"), MetaValue::F32(c.rms_norm_eps as f32));
    put(&key("rope.freq_base"), MetaValue::F32(c.rope.theta as f32));
    // Gemma's converters always write the head size; Llama's when it is not hidden / heads.
    if c.family != Family::Llama || c.head_dim * c.num_attention_heads != c.hidden_size {
        put(&key("attention.key_length"), MetaValue::U32(u32_of("head_dim", c.head_dim)?));
        put(&key("attention.value_length"), MetaValue::U32(u32_of("head_dim", c.head_dim)?));
    }
    let mut rope_freqs = None;
    match c.rope.scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            put(&key("rope.scaling.type"), MetaValue::Str("linear".into()));
            put(&key("rope.scaling.factor"), MetaValue::F32(factor as f32));
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }
            if c.family == Family::Llama =>
        {
            rope_freqs = Some(llama3_rope_factors(
                c.rope.theta,
                c.head_dim,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ));
        }
        RopeScaling::Llama3 { .. } => {
            return Err(bad("rope_scaling", format!("llama3 rope scaling on a {arch} model has no GGUF form")))
        }
    }
    if c.family == Family::Llama {
        put(&key("vocab_size"), MetaValue::U32(u32_of("vocab_size", c.vocab_size)?));
        put(&key("rope.dimension_count"), MetaValue::U32(u32_of("head_dim", c.head_dim)?));
    }
    if matches!(c.family, Family::Gemma2 | Family::Gemma3) {
        if c.family == Family::Gemma3 && (c.rope_local.theta != 10_000.0 || c.rope_local.scaling != RopeScaling::None) {
            return Err(bad(
                "rope_local_base_freq",
                format!(
                    "llama.cpp runs Gemma 3's sliding layers with rope base 10000, unscaled; this model has {:?}",
                    c.rope_local
                ),
            ));
        }
        if let Some(cap) = c.attn_logit_softcapping {
            put(&key("attn_logit_softcapping"), MetaValue::F32(cap as f32));
        }
        if let Some(cap) = c.final_logit_softcapping {
            put(&key("final_logit_softcapping"), MetaValue::F32(cap as f32));
        }
        let window = c.sliding_window.unwrap_or(4096);
        put(&key("attention.sliding_window"), MetaValue::U32(u32_of("sliding_window", window)?));
        let sliding = c.layer_kinds.iter().map(|k| *k == LayerKind::Sliding).collect();
        put(&key("attention.sliding_window_pattern"), MetaValue::Array(MetaArray::Bool(sliding)));
        put(&key("attention.scale"), MetaValue::F32(c.attention_scale as f32));
    }
    Ok((md, rope_freqs))
}

/// What [`export`] wrote.
pub struct ExportSummary {
    pub family: Family,
    pub tensors: usize,
    /// Tensor count per ggml type name.
    pub by_type: BTreeMap<&'static str, usize>,
    pub parameters: usize,
    pub file_bytes: u64,
}

/// A tensor of the checkpoint as f32 values: a bitsandbytes 4-bit projection is dequantized.
fn load_f32(ck: &Checkpoint, t: &ExportTensor) -> Result<Vec<f32>> {
    if let ([rows, cols], Some(module)) = (t.shape.as_slice(), t.hf.strip_suffix(".weight")) {
        if let Some(w) = bnb::load_linear(ck, module, [*rows, *cols])? {
            return Ok(w.dequantize(DType::F32)?.to_vec::<f32>());
        }
    }
    Ok(ck.load_shaped(&t.hf, &t.shape)?.to_dtype(DType::F32).to_vec::<f32>())
}

/// The model's name: config.json's `_name_or_path` (its last component when it is a hub id or a path), else
/// `fallback`.
fn model_name(dir: &Path, fallback: &str) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let config: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(&path, &e))?;
    let name = config["_name_or_path"].as_str().map(|n| n.trim_end_matches('/').rsplit('/').next().unwrap_or(n));
    Ok(name.filter(|n| !n.is_empty()).unwrap_or(fallback).to_string())
}

/// Writes the model folder `dir` as the GGUF file `out` (atomically) of file type `ft`; `fallback_name` becomes
/// `general.name` when config.json names no model.
pub fn export(dir: &Path, out: &Path, ft: FileType, fallback_name: &str) -> Result<ExportSummary> {
    let config = ModelConfig::load(dir)?;
    let hp = Hyper::from_config(&config);
    let name = model_name(dir, fallback_name)?;
    let (mut metadata, rope_freqs) = model_metadata(&config, &dir.join("config.json"), &name, ft)?;
    metadata.extend(hf_vocab::metadata(dir, config.vocab_size)?);
    if ft.is_quantized() {
        // llama-quantize rewrites these two keys at the end; following it makes our metadata its own, key for
        // key in order (its tensors are ours byte for byte, only sorted by layer and name).
        let (tail, rest): (Metadata, Metadata) =
            metadata.into_iter().partition(|(k, _)| k == "general.quantization_version" || k == "general.file_type");
        metadata = rest;
        metadata.extend(tail.into_iter().rev());
    }
    let ck = Checkpoint::open(dir)?;

    let plan = hp.export_plan();
    let mut entries: Vec<TensorEntry> = Vec::with_capacity(plan.len() + 1);
    if let Some(f) = &rope_freqs {
        entries.push(TensorEntry { name: "rope_freqs.weight".into(), dims: vec![f.len()], ty: GgmlType::F32 });
    }
    let first_planned = entries.len();
    let mix = MixModel {
        layers: config.num_hidden_layers,
        tied: config.tie_word_embeddings,
        llama_70b: config.family == Family::Llama
            && config.num_hidden_layers == 80
            && config.num_attention_heads != config.num_key_value_heads,
    };
    for t in &plan {
        let stored = ft.tensor_type(&mix, &t.gguf, &t.shape);
        entries.push(TensorEntry { name: t.gguf.clone(), dims: t.shape.iter().rev().copied().collect(), ty: stored });
    }

    // A weight the GGUF layout has no place for would otherwise vanish from the exported model. bitsandbytes
    // keeps a 4-bit weight's quantization state in `{weight}.*` tensors beside it.
    let planned: HashSet<&str> = plan.iter().map(|t| t.hf.as_str()).collect();
    let belongs = |n: &str| {
        planned.contains(n)
            || n.rsplit_once(".weight.").is_some_and(|(m, _)| planned.contains(format!("{m}.weight").as_str()))
            || (config.tie_word_embeddings && n == "lm_head.weight")
            || n.ends_with("rotary_emb.inv_freq")
    };
    if let Some(stray) = ck.names().into_iter().find(|n| !belongs(n)) {
        return Err(ck.tensor_error(stray, "has no counterpart in llama.cpp's layout"));
    }

    let file_bytes = writer::write(out, &metadata, &entries, |i| {
        if i < first_planned {
            let f = rope_freqs.as_deref().unwrap_or_default();
            return Ok(f.iter().flat_map(|v| v.to_le_bytes()).collect());
        }
        let t = &plan[i - first_planned];
        let values = t.apply(load_f32(&ck, t)?);
        quantize(entries[i].ty, &values).map_err(|e| ck.tensor_error(&t.hf, e))
    })?;

    let mut by_type = BTreeMap::new();
    for e in &entries {
        *by_type.entry(e.ty.name()).or_default() += 1;
    }
    Ok(ExportSummary {
        family: config.family,
        tensors: entries.len(),
        by_type,
        parameters: plan.iter().map(|t| t.shape.iter().product::<usize>()).sum(),
        file_bytes,
    })
}
