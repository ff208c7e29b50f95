//! PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`), as peft's `save_pretrained`
//! writes them and `PeftModel.from_pretrained` reads them.

use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::formats::fsutil::write_atomic;
use crate::transformer::CausalLm;
use qlora_autograd::{LoraAdapter, LoraConfig, LoraInit, Param};
use qlora_runtime::DType;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The prefix peft puts before a causal LM's module paths in adapter files.
pub const KEY_PREFIX: &str = "base_model.model.";

/// The parts of `adapter_config.json` qlora-rt uses; unknown fields are ignored, as peft ignores them across
/// versions.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// Per-module overrides, keyed by a module name or name suffix (peft's rank_pattern / alpha_pattern).
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
}

/// peft matches a pattern key against a module path as `(.*\.)?{key}$`; keys here are plain names, so that is
/// "equal, or ends with `.key`".
fn pattern_matches(key: &str, module: &str) -> bool {
    module == key || module.ends_with(&format!(".{key}"))
}

impl AdapterConfig {
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| Error::json(path, &e))?;
        let field = |k: &str| v.get(k).filter(|x| !x.is_null());
        let bad = |k: &str, what: &str| Error::config(path, k, what.to_string());
        if let Some(t) = field("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(bad("peft_type", &format!("\"{t}\" is not supported (only LORA, with or without DoRA)")));
            }
        }
        let r = field("r").and_then(Value::as_u64).ok_or_else(|| bad("r", "missing or not a positive integer"))?;
        let lora_alpha =
            field("lora_alpha").and_then(Value::as_f64).ok_or_else(|| bad("lora_alpha", "missing or not a number"))?;
        let flag = |k: &str| -> Result<bool> {
            match field(k) {
                None => Ok(false),
                Some(x) => x.as_bool().ok_or_else(|| bad(k, "expected true or false")),
            }
        };
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            match field(k) {
                None => Ok(vec![]),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(name, x)| {
                        x.as_f64().map(|n| (name.clone(), n)).ok_or_else(|| bad(k, "values must be numbers"))
                    })
                    .collect(),
                Some(_) => Err(bad(k, "expected an object")),
            }
        };
        Ok(AdapterConfig {
            r: r as usize,
            lora_alpha,
            lora_dropout: field("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            rank_pattern: pattern("rank_pattern")?.into_iter().map(|(k, n)| (k, n as usize)).collect(),
            alpha_pattern: pattern("alpha_pattern")?,
        })
    }

    /// The LoRA hyperparameters of one module after rank_pattern / alpha_pattern.
    pub fn for_module(&self, module: &str) -> LoraConfig {
        let r = self.rank_pattern.iter().find(|(k, _)| pattern_matches(k, module)).map_or(self.r, |(_, r)| *r);
        let alpha =
            self.alpha_pattern.iter().find(|(k, _)| pattern_matches(k, module)).map_or(self.lora_alpha, |(_, a)| *a);
        LoraConfig {
            r,
            alpha,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
            dropout: self.lora_dropout,
            init: LoraInit::Default,
        }
    }
}

/// Attaches the adapter in `dir` to `model`'s projections (trainable, f32). Returns how many modules it adapts.
/// Every `lora_*` tensor in the file must belong to a projection of the model, with matching shapes.
pub fn load_adapter(model: &mut CausalLm, dir: &Path) -> Result<usize> {
    let shapes: Vec<(String, [usize; 2])> =
        model.projections().into_iter().map(|p| (p.name.clone(), p.base.shape())).collect();
    let mut adapters = read_adapter(dir, &shapes)?;
    let adapted = adapters.len();
    for proj in model.projections_mut()? {
        if let Some(adapter) = adapters.remove(&proj.name) {
            proj.adapter = Some(adapter);
        }
    }
    Ok(adapted)
}

/// The adapter in `dir` for `projections` (module path and [out, in] of each), by module path: trainable f32
/// parameters, without building a model (what `qlora-rt merge` needs). Every `lora_*` tensor in the file must belong
/// to one of the projections, with matching shapes.
pub fn read_adapter(dir: &Path, projections: &[(String, [usize; 2])]) -> Result<BTreeMap<String, LoraAdapter>> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let cfg = AdapterConfig::parse(&text, &cfg_path)?;
    let ck = Checkpoint::from_files(&[dir.join("adapter_model.safetensors")])?;
    let mut used = BTreeSet::new();
    let mut adapters = BTreeMap::new();
    for (name, [out_f, in_f]) in projections {
        let key = |suffix: &str| format!("{KEY_PREFIX}{name}.{suffix}");
        let (a_key, b_key, m_key) = (key("lora_A.weight"), key("lora_B.weight"), key("lora_magnitude_vector"));
        if !ck.contains(&a_key) && !ck.contains(&b_key) {
            continue;
        }
        let config = cfg.for_module(name);
        let a = ck.load_shaped(&a_key, &[config.r, *in_f])?.to_dtype(DType::F32);
        let b = ck.load_shaped(&b_key, &[*out_f, config.r])?.to_dtype(DType::F32);
        let magnitude = if config.use_dora {
            let m = ck.load_shaped(&m_key, &[*out_f])?.to_dtype(DType::F32);
            used.insert(m_key);
            Some(Param::trainable(format!("{name}.lora_magnitude_vector"), m))
        } else {
            None
        };
        used.insert(a_key);
        used.insert(b_key);
        let adapter = LoraAdapter {
            lora_a: Param::trainable(format!("{name}.lora_A.weight"), a),
            lora_b: Param::trainable(format!("{name}.lora_B.weight"), b),
            magnitude,
            config,
        };
        adapters.insert(name.clone(), adapter);
    }
    if let Some(stray) = ck.names().into_iter().find(|n| !used.contains(*n)) {
        return Err(ck.tensor_error(stray, "does not belong to any adapted projection of this model"));
    }
    Ok(adapters)
}

/// Writes the model's adapters as a PEFT folder (`adapter_config.json`, `adapter_model.safetensors`, f32) that
/// `peft.PeftModel.from_pretrained` loads unchanged. Modules whose r or alpha differ from the most common
/// ones go into rank_pattern / alpha_pattern by full module path. Returns the number of adapted modules.
pub fn save_adapter(model: &CausalLm, dir: &Path, base_model_name_or_path: Option<&str>) -> Result<usize> {
    let adapters: Vec<(&str, &LoraAdapter)> =
        model.projections().into_iter().filter_map(|p| p.adapter.as_ref().map(|a| (p.name.as_str(), a))).collect();
    let Some((_, first)) = adapters.first() else {
        return Err(Error::Checkpoint { path: dir.into(), msg: "the model has no adapter to save".into() });
    };
    let most_common = |key: &dyn Fn(&LoraAdapter) -> String| -> String {
        let mut counts: Vec<(String, usize)> = Vec::new();
        for (_, a) in &adapters {
            let k = key(a);
            match counts.iter_mut().find(|(c, _)| *c == k) {
                Some((_, n)) => *n += 1,
                None => counts.push((k, 1)),
            }
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(k, _)| k).unwrap_or_default()
    };
    let r: usize = most_common(&|a| a.config.r.to_string()).parse().unwrap_or(first.config.r);
    let alpha: f64 = most_common(&|a| a.config.alpha.to_string()).parse().unwrap_or(first.config.alpha);
    let mut rank_pattern = serde_json::Map::new();
    let mut alpha_pattern = serde_json::Map::new();
    let mut targets: Vec<String> = Vec::new();
    let mut tensors: Vec<(String, qlora_runtime::Tensor)> = Vec::new();
    for (name, a) in &adapters {
        if a.config.r != r {
            rank_pattern.insert(name.to_string(), a.config.r.into());
        }
        if a.config.alpha != alpha {
            alpha_pattern.insert(name.to_string(), serde_json::json!(a.config.alpha));
        }
        let suffix = name.rsplit('.').next().unwrap_or(name).to_string();
        if !targets.contains(&suffix) {
            targets.push(suffix);
        }
        tensors.push((format!("{KEY_PREFIX}{name}.lora_A.weight"), a.lora_a.value()));
        tensors.push((format!("{KEY_PREFIX}{name}.lora_B.weight"), a.lora_b.value()));
        if let Some(m) = &a.magnitude {
            tensors.push((format!("{KEY_PREFIX}{name}.lora_magnitude_vector"), m.value()));
        }
    }
    targets.sort();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": first.config.dropout,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": first.config.use_rslora,
        "use_dora": first.config.use_dora,
        "init_lora_weights": true,
        "fan_in_fan_out": false,
        "modules_to_save": null,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": true,
        "revision": null,
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises");
    let bytes = safetensors_bytes(&tensors, dir)?;
    write_atomic(&dir.join("adapter_model.safetensors"), &bytes)?;
    write_atomic(&dir.join("adapter_config.json"), text.as_bytes())?;
    Ok(adapters.len())
}

/// Serialises f32 tensors into safetensors bytes with the `{"format": "pt"}` metadata transformers writes.
fn safetensors_bytes(tensors: &[(String, qlora_runtime::Tensor)], dir: &Path) -> Result<Vec<u8>> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.to_dtype(DType::F32).to_bytes(), t.shape().to_vec())).collect();
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, b, s)| TensorView::new(Dtype::F32, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Checkpoint { path: dir.into(), msg: format!("cannot serialise adapter: {e}") })?;
    let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
    safetensors::serialize(views, metadata)
        .map_err(|e| Error::Checkpoint { path: dir.into(), msg: format!("cannot serialise adapter: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_override_per_module() {
        let cfg = AdapterConfig::parse(
            r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"q_proj":4},"alpha_pattern":{"model.layers.1.mlp.down_proj":2}}"#,
            Path::new("adapter_config.json"),
        )
        .unwrap();
        assert_eq!(cfg.for_module("model.layers.0.self_attn.q_proj").r, 4);
        assert_eq!(cfg.for_module("model.layers.0.self_attn.k_proj").r, 8);
        assert_eq!(cfg.for_module("model.layers.1.mlp.down_proj").alpha, 2.0);
        assert_eq!(cfg.for_module("model.layers.11.mlp.down_proj").alpha, 16.0);
        let e = AdapterConfig::parse(r#"{"peft_type":"IA3","r":8}"#, Path::new("a.json")).unwrap_err().to_string();
        assert!(e.contains("peft_type") && e.contains("IA3"), "{e}");
        let e = AdapterConfig::parse(r#"{"r":8}"#, Path::new("a.json")).unwrap_err().to_string();
        assert!(e.contains("lora_alpha"), "{e}");
    }
}
