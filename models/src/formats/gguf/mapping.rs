//! llama.cpp's model layout → Hugging Face's: tensor names, the two transforms llama.cpp's converter
//! (`convert_hf_to_gguf.py`) applies, and a transformers `config.json` from the `{arch}.*` metadata keys.
//!
//! The transforms undone here: for Llama, `LlamaModel.permute` reorders the rows of q_proj and k_proj within
//! each head (k with the KV head count) for llama.cpp's interleaved rope; for Gemma 1/2/3, every
//! `*norm.weight` is stored as w + 1 (the Gemma RMSNorm's 1 + w), so 1 is subtracted. Gemma's q/k rows are
//! not permuted (llama.cpp runs Gemma with the rotate-half rope).

use super::dequant::dequantize;
use super::metadata::{MetaArray, MetaValue};
use super::reader::{GgufFile, TensorInfo};
use crate::config::{Family, ModelConfig, Rope, RopeScaling};
use crate::error::Result;
use crate::rope::inv_freq;
use qlora_runtime::rope_inv_freq;
use serde_json::{json, Map, Value};

/// What a GGUF tensor becomes besides being dequantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transform {
    None,
    /// Undo llama.cpp's per-head q/k row permutation.
    UnpermuteRows {
        heads: usize,
    },
    /// Gemma norms: stored w + 1, Hugging Face keeps w.
    MinusOne,
}

/// One Hugging Face tensor and where it comes from.
#[derive(Clone, Debug)]
pub struct HfTensor {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// The GGUF tensor it is read from, e.g. `blk.0.attn_q.weight`.
    pub source: String,
    /// Shape outermost first, e.g. `[out, in]`.
    pub shape: Vec<usize>,
    transform: Transform,
}

/// The hyperparameters the mapping needs, read once from the metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Hyper {
    pub family: Family,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub tied: bool,
}

/// `general.architecture` → family.
pub fn family(file: &GgufFile) -> Result<(Family, &str)> {
    let key = "general.architecture";
    let arch = file.get_str(key)?.ok_or_else(|| file.key_error(key, "missing"))?;
    let family = match arch {
        "llama" => Family::Llama,
        "gemma" => Family::Gemma,
        "gemma2" => Family::Gemma2,
        "gemma3" => Family::Gemma3,
        other => {
            return Err(file.key_error(key, format!("\"{other}\" is not supported (llama, gemma, gemma2, gemma3 are)")))
        }
    };
    Ok((family, arch))
}

/// A float as the file holds it: f32 metadata is widened to the shortest decimal that reads back as the same
/// f32 (1e-5 rather than 9.999999747378752e-6), which is what the original config.json said.
fn float(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    match file.metadata().get(key) {
        Some(MetaValue::F32(v)) => Ok(Some(v.to_string().parse().unwrap_or(f64::from(*v)))),
        _ => file.get_f64(key),
    }
}

fn tensor<'a>(file: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    file.tensor(name).ok_or_else(|| file.tensor_error(name, "missing from the GGUF file"))
}

impl Hyper {
    pub fn read(file: &GgufFile) -> Result<Self> {
        let (family, arch) = family(file)?;
        let key = |k: &str| format!("{arch}.{k}");
        let hidden = file.usize(&key("embedding_length"))?;
        let heads = file.usize(&key("attention.head_count"))?;
        let kv_key = key("attention.head_count_kv");
        let kv_heads = match file.get_u64(&kv_key)? {
            Some(n) => usize::try_from(n).map_err(|_| file.key_error(&kv_key, "too large"))?,
            None => heads,
        };
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(file.key_error(&kv_key, format!("{kv_heads} KV heads do not divide {heads} heads")));
        }
        let head_dim = match file.get_u64(&key("attention.key_length"))? {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => hidden / heads,
        };
        if let Some(v) = file.get_u64(&key("attention.value_length"))? {
            if v != head_dim as u64 {
                return Err(file.key_error(
                    &key("attention.value_length"),
                    format!("{v} differs from the key length {head_dim}, which no supported model does"),
                ));
            }
        }
        if let Some(r) = file.get_u64(&key("rope.dimension_count"))? {
            if r != head_dim as u64 {
                return Err(file.key_error(
                    &key("rope.dimension_count"),
                    format!("partial rotary embeddings ({r} of {head_dim} dimensions) are not supported"),
                ));
            }
        }
        if head_dim == 0 || head_dim % 2 != 0 || heads.checked_mul(head_dim).is_none() {
            let msg = format!("head dim {head_dim} must be even, and {heads} heads of it must fit in memory");
            return Err(file.key_error(&key("attention.key_length"), msg));
        }
        let embed = tensor(file, "token_embd.weight")?;
        let shape = embed.shape();
        if shape.len() != 2 || shape[1] != hidden {
            return Err(file.tensor_error(&embed.name, format!("shape {shape:?}, expected [vocab, {hidden}]")));
        }
        let vocab = shape[0];
        if let Some(tokens) = file.get_array("tokenizer.ggml.tokens")? {
            let n = super::tokenizer::array_len(tokens);
            if n > vocab {
                return Err(file.key_error(
                    "tokenizer.ggml.tokens",
                    format!("{n} tokens, but token_embd.weight has only {vocab} rows"),
                ));
            }
        }
        Ok(Hyper {
            family,
            hidden,
            intermediate: file.usize(&key("feed_forward_length"))?,
            layers: file.usize(&key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            tied: file.tensor("output.weight").is_none(),
        })
    }

    /// The Hugging Face name, shape and transform of a per-layer GGUF tensor kind (`attn_q`, `ffn_norm`, ...).
    fn layer_tensor(&self, kind: &str) -> Option<(&'static str, Vec<usize>, Transform)> {
        let (h, hd, f) = (self.hidden, self.head_dim, self.intermediate);
        let (q, kv) = (self.heads * hd, self.kv_heads * hd);
        let llama = self.family == Family::Llama;
        let sandwich = matches!(self.family, Family::Gemma2 | Family::Gemma3);
        let norm = if llama { Transform::None } else { Transform::MinusOne };
        let permute = |heads| if llama { Transform::UnpermuteRows { heads } } else { Transform::None };
        Some(match kind {
            "attn_q" => ("self_attn.q_proj", vec![q, h], permute(self.heads)),
            "attn_k" => ("self_attn.k_proj", vec![kv, h], permute(self.kv_heads)),
            "attn_v" => ("self_attn.v_proj", vec![kv, h], Transform::None),
            "attn_output" => ("self_attn.o_proj", vec![h, q], Transform::None),
            "ffn_gate" => ("mlp.gate_proj", vec![f, h], Transform::None),
            "ffn_up" => ("mlp.up_proj", vec![f, h], Transform::None),
            "ffn_down" => ("mlp.down_proj", vec![h, f], Transform::None),
            "attn_norm" => ("input_layernorm", vec![h], norm),
            // Gemma 2/3 have four norms per layer; llama.cpp's ffn_norm is then the one before the MLP.
            "ffn_norm" if sandwich => ("pre_feedforward_layernorm", vec![h], norm),
            "ffn_norm" => ("post_attention_layernorm", vec![h], norm),
            "post_attention_norm" if sandwich => ("post_attention_layernorm", vec![h], norm),
            "post_ffw_norm" if sandwich => ("post_feedforward_layernorm", vec![h], norm),
            "attn_q_norm" if self.family == Family::Gemma3 => ("self_attn.q_norm", vec![hd], norm),
            "attn_k_norm" if self.family == Family::Gemma3 => ("self_attn.k_norm", vec![hd], norm),
            _ => return None,
        })
    }

    /// Per-layer tensor kinds every layer must have.
    fn required_layer_kinds(&self) -> Vec<&'static str> {
        let mut kinds = vec![
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        if matches!(self.family, Family::Gemma2 | Family::Gemma3) {
            kinds.extend(["post_attention_norm", "post_ffw_norm"]);
        }
        if self.family == Family::Gemma3 {
            kinds.extend(["attn_q_norm", "attn_k_norm"]);
        }
        kinds
    }

    /// The hyperparameters of a Hugging Face model, for writing it as GGUF.
    pub fn from_config(c: &ModelConfig) -> Self {
        Hyper {
            family: c.family,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            vocab: c.vocab_size,
            tied: c.tie_word_embeddings,
        }
    }

    /// Every GGUF tensor of the model and the Hugging Face tensor it is made from, in llama.cpp's file order
    /// (embeddings, the layers, the final norm, the output head); `output.weight` only when untied.
    pub fn export_plan(&self) -> Vec<ExportTensor> {
        let norm = if self.family == Family::Llama { Transform::None } else { Transform::MinusOne };
        let one = |gguf: &str, hf: &str, shape: Vec<usize>, transform| ExportTensor {
            gguf: format!("{gguf}.weight"),
            hf: format!("{hf}.weight"),
            shape,
            transform,
        };
        let mut out = vec![one("token_embd", "model.embed_tokens", vec![self.vocab, self.hidden], Transform::None)];
        for i in 0..self.layers {
            for kind in self.required_layer_kinds() {
                let (hf, shape, transform) = self.layer_tensor(kind).expect("every required kind maps");
                out.push(one(&format!("blk.{i}.{kind}"), &format!("model.layers.{i}.{hf}"), shape, transform));
            }
        }
        out.push(one("output_norm", "model.norm", vec![self.hidden], norm));
        if !self.tied {
            out.push(one("output", "lm_head", vec![self.vocab, self.hidden], Transform::None));
        }
        out
    }
}

/// One tensor written by `export-gguf`: its GGUF name, the Hugging Face tensor it comes from, and what
/// llama.cpp's converter does to it on the way (the inverse of the import's transform).
#[derive(Clone, Debug)]
pub struct ExportTensor {
    pub gguf: String,
    pub hf: String,
    /// Shape outermost first, e.g. `[out, in]`.
    pub shape: Vec<usize>,
    transform: Transform,
}

impl ExportTensor {
    /// The Hugging Face values (row-major) as llama.cpp stores them: q/k rows permuted for Llama, Gemma norms
    /// plus one.
    pub fn apply(&self, mut values: Vec<f32>) -> Vec<f32> {
        match self.transform {
            Transform::None => values,
            Transform::UnpermuteRows { heads } => permute_rows(&values, heads, self.shape[1]),
            Transform::MinusOne => {
                values.iter_mut().for_each(|v| *v += 1.0);
                values
            }
        }
    }
}

/// Every GGUF tensor's Hugging Face counterpart, checked for shape and completeness. `rope_freqs.weight` has
/// none (it becomes `rope_scaling` in config.json); any other unknown tensor is an error.
pub fn plan(file: &GgufFile, hp: &Hyper) -> Result<Vec<HfTensor>> {
    let norm = if hp.family == Family::Llama { Transform::None } else { Transform::MinusOne };
    let mut out = Vec::with_capacity(file.tensors().len());
    for t in file.tensors() {
        let (name, shape, transform) = match t.name.as_str() {
            "token_embd.weight" => {
                ("model.embed_tokens.weight".to_string(), vec![hp.vocab, hp.hidden], Transform::None)
            }
            "output_norm.weight" => ("model.norm.weight".to_string(), vec![hp.hidden], norm),
            "output.weight" => ("lm_head.weight".to_string(), vec![hp.vocab, hp.hidden], Transform::None),
            "rope_freqs.weight" => continue,
            other => {
                let unknown = || file.tensor_error(other, "has no Hugging Face counterpart known to qlora-rt");
                let rest = other.strip_prefix("blk.").ok_or_else(unknown)?;
                let (layer, rest) = rest.split_once('.').ok_or_else(unknown)?;
                let kind = rest.strip_suffix(".weight").ok_or_else(unknown)?;
                let layer: usize = layer.parse().map_err(|_| unknown())?;
                if layer >= hp.layers {
                    return Err(file.tensor_error(other, format!("layer {layer} of a {}-layer model", hp.layers)));
                }
                let (hf, shape, transform) = hp.layer_tensor(kind).ok_or_else(unknown)?;
                (format!("model.layers.{layer}.{hf}.weight"), shape, transform)
            }
        };
        if t.shape() != shape {
            return Err(file.tensor_error(
                &t.name,
                format!("shape {:?}, expected {shape:?} from the metadata (for {name})", t.shape()),
            ));
        }
        out.push(HfTensor { name, source: t.name.clone(), shape, transform });
    }
    let mut missing: Vec<String> = ["token_embd", "output_norm"]
        .iter()
        .map(|k| format!("{k}.weight"))
        .chain(
            (0..hp.layers)
                .flat_map(|i| hp.required_layer_kinds().into_iter().map(move |k| format!("blk.{i}.{k}.weight"))),
        )
        .filter(|n| file.tensor(n).is_none())
        .collect();
    if !missing.is_empty() {
        let n = missing.len();
        missing.truncate(3);
        return Err(
            file.tensor_error(&missing[0], format!("missing ({n} expected tensors missing: {})", missing.join(", ")))
        );
    }
    Ok(out)
}

/// Rows `[heads, 2, head_dim/2]` (Hugging Face's order) → `[heads, head_dim/2, 2]` (llama.cpp's), each row
/// `cols` values long: convert_hf_to_gguf.py's `LlamaModel.permute`, which reshapes to
/// `[heads, 2, head_dim/2, cols]` and swaps the two middle axes.
pub fn permute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    let half = rows / heads / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for part in 0..2 {
            for i in 0..half {
                let hf = (h * 2 + part) * half + i;
                let gg = (h * half + i) * 2 + part;
                out[gg * cols..(gg + 1) * cols].copy_from_slice(&data[hf * cols..(hf + 1) * cols]);
            }
        }
    }
    out
}

/// Rows `[heads, head_dim/2, 2]` (llama.cpp's order) → `[heads, 2, head_dim/2]` (Hugging Face's), each row
/// `cols` values long: the inverse of `LlamaModel.permute`, which reshapes to `[heads, 2, head_dim/2, cols]`
/// and swaps the two middle axes.
pub fn unpermute_rows(data: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = data.len() / cols;
    let half = rows / heads / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..heads {
        for i in 0..half {
            for pair in 0..2 {
                let src = (h * half + i) * 2 + pair;
                let dst = (h * 2 + pair) * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// A GGUF tensor's values as f32, row-major.
fn dequantized(file: &GgufFile, t: &TensorInfo) -> Result<Vec<f32>> {
    let mut values = vec![0.0f32; t.n_elements];
    dequantize(t.ty, file.tensor_bytes(t), &mut values).map_err(|e| file.tensor_error(&t.name, e))?;
    Ok(values)
}

impl HfTensor {
    /// Dequantizes the source tensor and applies the transform: the Hugging Face values, row-major.
    pub fn load(&self, file: &GgufFile) -> Result<Vec<f32>> {
        let mut values = dequantized(file, tensor(file, &self.source)?)?;
        Ok(match self.transform {
            Transform::None => values,
            Transform::UnpermuteRows { heads } => unpermute_rows(&values, heads, self.shape[1]),
            Transform::MinusOne => {
                values.iter_mut().for_each(|v| *v -= 1.0);
                values
            }
        })
    }
}

/// The `rope_scaling` of config.json: llama.cpp writes Llama 3.1-style scaling as a `rope_freqs.weight` tensor
/// of per-frequency divisors (`LlamaModel.generate_extra_tensors`, with low/high frequency factors 1 and 4 and
/// an original context of 8192 always), and linear scaling as `{arch}.rope.scaling.{type,factor}`.
fn rope_scaling(file: &GgufFile, arch: &str, hp: &Hyper, theta: f64) -> Result<Value> {
    let type_key = format!("{arch}.rope.scaling.type");
    let factor_key = format!("{arch}.rope.scaling.factor");
    let scaling = file.get_str(&type_key)?;
    if let Some(t) = file.tensor("rope_freqs.weight") {
        let divisors = dequantized(file, t)?;
        let factor = divisors.iter().copied().fold(f32::MIN, f32::max) as f64;
        let candidate = RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let scaled = inv_freq(&Rope { theta, scaling: candidate }, hp.head_dim);
        let base = rope_inv_freq::<f32>(hp.head_dim, theta);
        let matches = divisors.len() == base.len()
            && base.iter().zip(&scaled).zip(&divisors).all(|((b, s), d)| ((b / d - s) / s).abs() < 1e-4);
        if !matches {
            return Err(file.tensor_error(
                "rope_freqs.weight",
                format!("does not match Llama 3 rope scaling (factor {factor}, frequency factors 1 and 4, original context 8192)"),
            ));
        }
        return Ok(json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}));
    }
    match scaling {
        None | Some("none") => Ok(Value::Null),
        Some("linear") => {
            let factor = float(file, &factor_key)?.ok_or_else(|| file.key_error(&factor_key, "missing"))?;
            Ok(json!({"rope_type": "linear", "factor": factor}))
        }
        Some(other) => Err(file.key_error(&type_key, format!("\"{other}\" is not supported (linear is)"))),
    }
}

/// The sliding-window pattern of Gemma 2/3: which layers use local attention.
fn sliding_layers(file: &GgufFile, arch: &str, hp: &Hyper) -> Result<Vec<bool>> {
    let key = format!("{arch}.attention.sliding_window_pattern");
    let n = hp.layers;
    Ok(match file.metadata().get(&key) {
        None if hp.family == Family::Gemma2 => (0..n).map(|i| i % 2 == 0).collect(),
        // Gemma 3: five local layers, then a global one (FORMATS.md).
        None => (0..n).map(|i| (i + 1) % 6 != 0).collect(),
        // Newer llama.cpp writes the pattern per layer.
        Some(MetaValue::Array(MetaArray::Bool(v))) if v.len() == n => v.clone(),
        Some(v) => match v.as_u64() {
            Some(p) if p > 0 => (0..n).map(|i| (i as u64 + 1) % p != 0).collect(),
            _ => return Err(file.key_error(&key, format!("expected a period or {n} bools, got {v:?}"))),
        },
    })
}

/// A transformers config.json for the model; `torch_dtype` names the dtype the weights are written in.
pub fn config_json(file: &GgufFile, hp: &Hyper, torch_dtype: &str) -> Result<Value> {
    let (_, arch) = family(file)?;
    let key = |k: &str| format!("{arch}.{k}");
    let default_theta = if hp.family == Family::Gemma3 { 1_000_000.0 } else { 10_000.0 };
    let theta = float(file, &key("rope.freq_base"))?.unwrap_or(default_theta);
    let mut c = Map::new();
    let (architecture, model_type) = match hp.family {
        Family::Llama => ("LlamaForCausalLM", "llama"),
        Family::Gemma => ("GemmaForCausalLM", "gemma"),
        Family::Gemma2 => ("Gemma2ForCausalLM", "gemma2"),
        Family::Gemma3 => ("Gemma3ForCausalLM", "gemma3_text"),
    };
    c.insert("architectures".into(), json!([architecture]));
    c.insert("model_type".into(), json!(model_type));
    // transformers' field for where the model came from; `export-gguf` writes it back as `general.name`.
    if let Some(name) = file.get_str("general.name")? {
        c.insert("_name_or_path".into(), json!(name));
    }
    c.insert("vocab_size".into(), json!(hp.vocab));
    c.insert("hidden_size".into(), json!(hp.hidden));
    c.insert("intermediate_size".into(), json!(hp.intermediate));
    c.insert("num_hidden_layers".into(), json!(hp.layers));
    c.insert("num_attention_heads".into(), json!(hp.heads));
    c.insert("num_key_value_heads".into(), json!(hp.kv_heads));
    c.insert("head_dim".into(), json!(hp.head_dim));
    let eps = float(file, &key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6);
    c.insert("rms_norm_eps".into(), json!(eps));
    c.insert("rope_theta".into(), json!(theta));
    c.insert("rope_scaling".into(), rope_scaling(file, arch, hp, theta)?);
    let context = file.get_u64(&key("context_length"))?.unwrap_or(2048);
    c.insert("max_position_embeddings".into(), json!(context));
    c.insert("tie_word_embeddings".into(), json!(hp.tied));
    c.insert("attention_bias".into(), json!(false));
    if hp.family == Family::Llama {
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("mlp_bias".into(), json!(false));
    } else {
        // GGUF records neither the activation nor Gemma 2/3's attention scale: the family's defaults (FORMATS.md).
        c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        c.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
    }
    if matches!(hp.family, Family::Gemma2 | Family::Gemma3) {
        // qlora-rt's export records the attention scale (llama.cpp derives its own and ignores the key).
        let scalar = match float(file, &key("attention.scale"))? {
            Some(s) if s > 0.0 => {
                let q = s.powi(-2);
                if (q - q.round()).abs() < 1e-3 * q {
                    json!(q.round() as u64)
                } else {
                    json!(q)
                }
            }
            _ => json!(256),
        };
        c.insert("query_pre_attn_scalar".into(), scalar);
        let window_key = key("attention.sliding_window");
        let window = file.get_u64(&window_key)?.ok_or_else(|| file.key_error(&window_key, "missing"))?;
        c.insert("sliding_window".into(), json!(window));
        let types: Vec<&str> = sliding_layers(file, arch, hp)?
            .into_iter()
            .map(|s| if s { "sliding_attention" } else { "full_attention" })
            .collect();
        c.insert("layer_types".into(), json!(types));
        let cap = |k: &str| -> Result<Value> { Ok(float(file, &key(k))?.map_or(Value::Null, |v| json!(v))) };
        c.insert("attn_logit_softcapping".into(), cap("attn_logit_softcapping")?);
        c.insert("final_logit_softcapping".into(), cap("final_logit_softcapping")?);
    }
    if hp.family == Family::Gemma3 {
        c.insert("rope_local_base_freq".into(), json!(10_000.0));
    }
    for (field, gguf_key) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(id) = file.get_u64(gguf_key)? {
            c.insert(field.into(), json!(id));
        }
    }
    c.insert("torch_dtype".into(), json!(torch_dtype));
    Ok(Value::Object(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // Two heads of head_dim 4, rows tagged by their HF index.
        let (heads, cols) = (2, 3);
        let hf: Vec<f32> = (0..8 * cols).map(|i| (i / cols) as f32 * 10.0 + (i % cols) as f32).collect();
        let gguf = permute_rows(&hf, heads, cols);
        // Head 0's HF rows are [r0 r1 | r2 r3] (two halves); llama.cpp interleaves them as r0 r2 r1 r3.
        let row = |v: &[f32], r: usize| v[r * cols] / 10.0;
        assert_eq!((0..8).map(|r| row(&gguf, r)).collect::<Vec<_>>(), vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        assert_eq!(unpermute_rows(&gguf, heads, cols), hf);
        // GQA: one KV head of head_dim 6.
        let hf: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(unpermute_rows(&permute_rows(&hf, 1, 2), 1, 2), hf);
    }
}
