//! `config.json` of Llama and Gemma (1, 2, 3 text) checkpoints, in both the transformers 4 layout
//! (`rope_theta`, `rope_scaling`) and the transformers 5 layout (`rope_parameters`, per layer type for Gemma 3).

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llama,
    Gemma,
    Gemma2,
    Gemma3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU MLP (Llama).
    Silu,
    /// GeGLU with tanh-approximated GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Llama 3.1/3.2 frequency-band scaling (transformers `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    /// Positions divided by `factor` (Gemma 3 global layers of the larger models).
    Linear {
        factor: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: RopeScaling,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Full,
    Sliding,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub activation: Activation,
    /// Rotary parameters of full-attention layers.
    pub rope: Rope,
    /// Rotary parameters of sliding-window layers (Gemma 3's local base); `rope` elsewhere.
    pub rope_local: Rope,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Attention scale = query_pre_attn_scalar^−½ (Gemma 2/3); head_dim^−½ otherwise.
    pub attention_scale: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub sliding_window: Option<usize>,
    pub layer_kinds: Vec<LayerKind>,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// Field access with errors that name the file and the field.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::config(self.path, field, msg)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing"))
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, got {v}"))),
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(field, format!("expected a number, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(field, format!("expected true or false, got {v}"))),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(field, format!("expected a string, got {v}"))),
        }
    }

    /// A token id field that may be one id or a list (`eos_token_id`).
    fn ids(&self, field: &str) -> Result<Vec<u32>> {
        let bad = || self.err(field, "expected a token id or a list of token ids");
        match self.get(field) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().map(|n| n as u32).ok_or_else(bad)).collect(),
            Some(v) => Ok(vec![v.as_u64().ok_or_else(bad)? as u32]),
        }
    }
}

/// Parses one rope dict (`rope_scaling` or a `rope_parameters` entry) with `theta` taken from it or given.
fn parse_rope(f: &Fields, field: &str, dict: Option<&Value>, theta: f64) -> Result<Rope> {
    let Some(dict) = dict.filter(|v| !v.is_null()) else {
        return Ok(Rope { theta, scaling: RopeScaling::None });
    };
    let Some(map) = dict.as_object() else {
        return Err(f.err(field, format!("expected an object, got {dict}")));
    };
    let num = |k: &str| map.get(k).and_then(Value::as_f64);
    let theta = num("rope_theta").unwrap_or(theta);
    let kind = map.get("rope_type").or_else(|| map.get("type")).and_then(Value::as_str).unwrap_or("default");
    let need =
        |k: &str| num(k).ok_or_else(|| f.err(&format!("{field}.{k}"), format!("required by rope_type \"{kind}\"")));
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(f.err(field, format!("rope_type \"{other}\" is not supported (default, linear, llama3 are)")))
        }
    };
    Ok(Rope { theta, scaling })
}

impl ModelConfig {
    /// Reads `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&text, &path)
    }

    /// Parses config.json text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::json(path, &e))?;
        let Some(map) = root.as_object() else {
            return Err(Error::config(path, "(root)", "expected a JSON object"));
        };
        // Multimodal Gemma 3 checkpoints nest the language model under text_config.
        let map = match map.get("text_config").and_then(Value::as_object) {
            Some(text) if map.get("model_type").and_then(Value::as_str) == Some("gemma3") => text,
            _ => map,
        };
        let f = Fields { path, map };
        let model_type = f.opt_str("model_type")?.unwrap_or("");
        let family = match model_type {
            "llama" | "mistral" => Family::Llama,
            "gemma" => Family::Gemma,
            "gemma2" => Family::Gemma2,
            "gemma3_text" | "gemma3" => Family::Gemma3,
            other => {
                return Err(f.err(
                    "model_type",
                    format!("\"{other}\" is not supported (llama, gemma, gemma2, gemma3_text are)"),
                ))
            }
        };
        let gemma = family != Family::Llama;
        let hidden_size = f.usize("hidden_size")?;
        let num_attention_heads = f.usize("num_attention_heads")?;
        let num_key_value_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if num_attention_heads > 0 => hidden_size / num_attention_heads,
            None => return Err(f.err("num_attention_heads", "must be positive")),
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads = {num_attention_heads}"),
            ));
        }
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(
                f.err("head_dim", format!("must be a positive even number for rotary embeddings, got {head_dim}"))
            );
        }
        let num_hidden_layers = f.usize("num_hidden_layers")?;

        let act_name = f.opt_str("hidden_activation")?.or(f.opt_str("hidden_act")?);
        let activation = match (family, act_name) {
            (Family::Llama, None | Some("silu")) => Activation::Silu,
            // Gemma's reference implementation uses the tanh approximation even where configs say "gelu".
            (_, None | Some("gelu_pytorch_tanh" | "gelu" | "gelu_new")) if gemma => Activation::GeluTanh,
            (_, Some(other)) => {
                return Err(f.err("hidden_act", format!("\"{other}\" is not supported for {model_type}")))
            }
            (_, None) => Activation::Silu,
        };

        let default_theta = if family == Family::Gemma3 { 1_000_000.0 } else { 10_000.0 };
        let base_theta = f.opt_f64("rope_theta")?.unwrap_or(default_theta);
        let (rope, rope_local) = match f.get("rope_parameters") {
            // transformers 5: per layer type for Gemma 3, one dict otherwise.
            Some(Value::Object(p)) if p.contains_key("full_attention") || p.contains_key("sliding_attention") => {
                let full = parse_rope(&f, "rope_parameters.full_attention", p.get("full_attention"), base_theta)?;
                let local = parse_rope(&f, "rope_parameters.sliding_attention", p.get("sliding_attention"), 10_000.0)?;
                (full, local)
            }
            Some(p) => {
                let r = parse_rope(&f, "rope_parameters", Some(p), base_theta)?;
                (r, r)
            }
            None => {
                let r = parse_rope(&f, "rope_scaling", f.get("rope_scaling"), base_theta)?;
                let local_theta = f.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0);
                let local =
                    if family == Family::Gemma3 { Rope { theta: local_theta, scaling: RopeScaling::None } } else { r };
                (r, local)
            }
        };

        let sliding_window = match family {
            Family::Gemma2 | Family::Gemma3 => Some(f.opt_usize("sliding_window")?.unwrap_or(4096)),
            _ => None,
        };
        let layer_kinds = match f.get("layer_types") {
            Some(Value::Array(a)) => {
                let kinds: Result<Vec<LayerKind>> = a
                    .iter()
                    .map(|v| match v.as_str() {
                        Some("full_attention") => Ok(LayerKind::Full),
                        Some("sliding_attention") => Ok(LayerKind::Sliding),
                        _ => Err(f.err("layer_types", format!("unknown layer type {v}"))),
                    })
                    .collect();
                let kinds = kinds?;
                if kinds.len() != num_hidden_layers {
                    return Err(f.err("layer_types", format!("{} entries for {num_hidden_layers} layers", kinds.len())));
                }
                kinds
            }
            _ => (0..num_hidden_layers)
                .map(|i| match family {
                    // Gemma 2: even layers slide; Gemma 3: every sixth layer is global.
                    Family::Gemma2 if i % 2 == 0 => LayerKind::Sliding,
                    Family::Gemma3 => {
                        let pattern = f.opt_usize("sliding_window_pattern").ok().flatten().unwrap_or(6).max(1);
                        if (i + 1) % pattern == 0 {
                            LayerKind::Full
                        } else {
                            LayerKind::Sliding
                        }
                    }
                    _ => LayerKind::Full,
                })
                .collect(),
        };
        let attention_scale = match family {
            Family::Gemma2 | Family::Gemma3 => {
                let s = f.opt_f64("query_pre_attn_scalar")?.unwrap_or(head_dim as f64);
                if s <= 0.0 {
                    return Err(f.err("query_pre_attn_scalar", "must be positive"));
                }
                s.powf(-0.5)
            }
            _ => (head_dim as f64).powf(-0.5),
        };
        let (attn_cap, final_cap) = match family {
            Family::Gemma2 => (
                f.opt_f64("attn_logit_softcapping")?.or(Some(50.0)),
                f.opt_f64("final_logit_softcapping")?.or(Some(30.0)),
            ),
            _ => (f.opt_f64("attn_logit_softcapping")?, f.opt_f64("final_logit_softcapping")?),
        };
        for (name, cap) in [("attn_logit_softcapping", attn_cap), ("final_logit_softcapping", final_cap)] {
            if cap.is_some_and(|c| c.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)) {
                return Err(f.err(name, "must be positive"));
            }
        }
        Ok(ModelConfig {
            family,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            activation,
            rope,
            rope_local,
            tie_word_embeddings: f.bool_or("tie_word_embeddings", gemma)?,
            attention_bias: f.bool_or("attention_bias", false)?,
            mlp_bias: f.bool_or("mlp_bias", false)?,
            attention_scale,
            attn_logit_softcapping: attn_cap,
            final_logit_softcapping: final_cap,
            sliding_window,
            layer_kinds,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            bos_token_id: f.ids("bos_token_id")?.first().copied(),
            eos_token_ids: f.ids("eos_token_id")?,
            pad_token_id: f.ids("pad_token_id")?.first().copied(),
        })
    }

    /// Rotary parameters of layer `i`.
    pub fn rope_for_layer(&self, i: usize) -> &Rope {
        match self.layer_kinds.get(i) {
            Some(LayerKind::Sliding) => &self.rope_local,
            _ => &self.rope,
        }
    }
}

/// A decoder layer's linear modules in transformers' order (q, k, v, o, gate, up, down), as paths under
/// `model.layers.{i}`: the one list that loading, moving, adapting, merging and quantizing walk.
pub const PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The projections' own names (`q_proj`, …, `down_proj`) in [`PROJECTIONS`] order: what peft's `target_modules`
/// lists and a module path ends with.
pub fn projection_kinds() -> [&'static str; 7] {
    PROJECTIONS.map(|p| p.rsplit_once('.').map_or(p, |(_, kind)| kind))
}

impl ModelConfig {
    /// Layer `i`'s projections in [`PROJECTIONS`] order: module path, [out, in], and whether it has a bias.
    pub fn layer_projections(&self, i: usize) -> [(String, [usize; 2], bool); 7] {
        let (h, im, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (qo, kvo) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let (ab, mb) = (self.attention_bias, self.mlp_bias);
        let shapes =
            [([qo, h], ab), ([kvo, h], ab), ([kvo, h], ab), ([h, qo], ab), ([im, h], mb), ([im, h], mb), ([h, im], mb)];
        std::array::from_fn(|j| (format!("model.layers.{i}.{}", PROJECTIONS[j]), shapes[j].0, shapes[j].1))
    }

    /// Every layer's projections, layer by layer: module path and [out, in].
    pub fn projections(&self) -> Vec<(String, [usize; 2])> {
        (0..self.num_hidden_layers)
            .flat_map(|i| self.layer_projections(i))
            .map(|(name, shape, _)| (name, shape))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ModelConfig> {
        ModelConfig::parse(s, Path::new("config.json"))
    }

    #[test]
    fn llama31_v4_and_v5_layouts_agree() {
        let v4 = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"rms_norm_eps":1e-5,
            "rope_theta":500000.0,"rope_scaling":{"factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_type":"llama3"},"eos_token_id":[128001,128008,128009],
            "bos_token_id":128000,"tie_word_embeddings":false}"#;
        let v5 = r#"{"model_type":"llama","vocab_size":128256,"hidden_size":4096,"intermediate_size":14336,
            "num_hidden_layers":32,"num_attention_heads":32,"num_key_value_heads":8,"rms_norm_eps":1e-5,
            "rope_parameters":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192,"rope_theta":500000.0},"eos_token_id":[128001,128008,128009],
            "bos_token_id":128000,"tie_word_embeddings":false}"#;
        let (a, b) = (parse(v4).unwrap(), parse(v5).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.head_dim, 128);
        assert_eq!(a.rope.theta, 500000.0);
        assert!(matches!(a.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(a.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(a.activation, Activation::Silu);
        assert!((a.attention_scale - 128f64.powf(-0.5)).abs() < 1e-15);
    }

    #[test]
    fn gemma2_defaults_and_gemma3_layer_pattern() {
        let g2 = r#"{"model_type":"gemma2","vocab_size":256000,"hidden_size":2304,"intermediate_size":9216,
            "num_hidden_layers":4,"num_attention_heads":8,"num_key_value_heads":4,"head_dim":256,
            "query_pre_attn_scalar":256,"hidden_activation":"gelu_pytorch_tanh"}"#;
        let c = parse(g2).unwrap();
        assert_eq!(c.layer_kinds, vec![LayerKind::Sliding, LayerKind::Full, LayerKind::Sliding, LayerKind::Full]);
        assert_eq!((c.attn_logit_softcapping, c.final_logit_softcapping), (Some(50.0), Some(30.0)));
        assert!(c.tie_word_embeddings);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.attention_scale, 1.0 / 16.0);
        let g3 = r#"{"model_type":"gemma3_text","vocab_size":262144,"hidden_size":640,"intermediate_size":2048,
            "num_hidden_layers":12,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":256,
            "query_pre_attn_scalar":256,"sliding_window":512,
            "rope_parameters":{"sliding_attention":{"rope_type":"default","rope_theta":10000.0},
                               "full_attention":{"rope_type":"linear","factor":8.0,"rope_theta":1000000.0}}}"#;
        let c = parse(g3).unwrap();
        let full: Vec<usize> = (0..12).filter(|&i| c.layer_kinds[i] == LayerKind::Full).collect();
        assert_eq!(full, vec![5, 11]);
        assert_eq!(c.rope_for_layer(0).theta, 10000.0);
        assert_eq!(c.rope_for_layer(5), &Rope { theta: 1e6, scaling: RopeScaling::Linear { factor: 8.0 } });
        assert_eq!(c.sliding_window, Some(512));
        assert_eq!(c.attn_logit_softcapping, None);
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (r#"{"model_type":"gpt2"}"#, "model_type"),
            (
                r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
                "num_key_value_heads",
            ),
            (
                r#"{"model_type":"llama","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
                "vocab_size",
            ),
            (
                r#"{"model_type":"llama","vocab_size":"many","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2}"#,
                "vocab_size",
            ),
            (
                r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"rope_type":"yarn","factor":2}}"#,
                "rope_scaling",
            ),
        ];
        for (json, field) in cases {
            let e = parse(json).unwrap_err().to_string();
            assert!(e.starts_with("config.json: ") && e.contains(field), "{json} -> {e}");
        }
        let e = parse("{\"model_type\": \"llama\",\n  oops}").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }
}
