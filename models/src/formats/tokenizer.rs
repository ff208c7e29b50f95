//! The tokenizer of a Hugging Face model folder: `tokenizer.json` (through the `tokenizers` crate), the special
//! tokens, BOS/EOS policy and chat template of `tokenizer_config.json` (or `chat_template.jinja`, where newer
//! transformers put the template), and the stop tokens and sampling defaults of `generation_config.json`. Only
//! `tokenizer.json` is required. Owns text ↔ ids; applying a chat template is `data::template`'s job.

use crate::error::{Error, Result};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// A special token by text and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    pub text: String,
    pub id: u32,
}

/// What `generation_config.json` says; absent fields are `None` (transformers' defaults then apply).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationConfig {
    pub bos_token_id: Option<u32>,
    /// Every id that ends generation (`eos_token_id` may be one id or a list).
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `tokenizer.json`, named in encode/decode errors.
    path: PathBuf,
    pub bos: Option<SpecialToken>,
    pub eos: Option<SpecialToken>,
    pub pad: Option<SpecialToken>,
    /// `add_bos_token` / `add_eos_token` of tokenizer_config.json when given (see [`Tokenizer::encode`]).
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// The Jinja chat template, when the folder has one.
    pub chat_template: Option<String>,
    pub generation: GenerationConfig,
}

fn read_json(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    match serde_json::from_str(&text).map_err(|e| Error::json(path, &e))? {
        Value::Object(m) => Ok(Some(m)),
        _ => Err(Error::config(path, "(root)", "expected a JSON object")),
    }
}

/// A token field of tokenizer_config.json: a string, or an AddedToken object `{"content": ...}`.
fn token_text(path: &Path, map: &Map<String, Value>, field: &str) -> Result<Option<String>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::config(path, field, "an AddedToken object needs a string \"content\"")),
        },
        Some(v) => Err(Error::config(path, field, format!("expected a token string, got {v}"))),
    }
}

fn opt_bool(path: &Path, map: &Map<String, Value>, field: &str) -> Result<Option<bool>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(Error::config(path, field, format!("expected true or false, got {v}"))),
    }
}

fn opt_f64(path: &Path, map: &Map<String, Value>, field: &str) -> Result<Option<f64>> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| Error::config(path, field, format!("expected a number, got {v}")))
        }
    }
}

fn opt_id(path: &Path, map: &Map<String, Value>, field: &str) -> Result<Option<u32>> {
    Ok(ids(path, map, field)?.first().copied())
}

fn ids(path: &Path, map: &Map<String, Value>, field: &str) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| Error::config(path, field, format!("expected a token id or a list of them, got {v}")))
    };
    match map.get(field) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

impl GenerationConfig {
    /// Reads `dir/generation_config.json`; a folder without one gets the empty config.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("generation_config.json");
        let Some(map) = read_json(&path)? else { return Ok(Self::default()) };
        let p = path.as_path();
        let usize_field = |field: &str| -> Result<Option<usize>> {
            match map.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| Error::config(p, field, format!("expected a non-negative integer, got {v}"))),
            }
        };
        Ok(GenerationConfig {
            bos_token_id: opt_id(p, &map, "bos_token_id")?,
            eos_token_ids: ids(p, &map, "eos_token_id")?,
            pad_token_id: opt_id(p, &map, "pad_token_id")?,
            do_sample: opt_bool(p, &map, "do_sample")?,
            temperature: opt_f64(p, &map, "temperature")?,
            top_k: usize_field("top_k")?,
            top_p: opt_f64(p, &map, "top_p")?,
            max_new_tokens: usize_field("max_new_tokens")?,
        })
    }
}

/// The chat template: `chat_template.jinja` wins (transformers ≥ 4.47 writes it there), else the
/// `chat_template` field, which is a string or a list of named templates (the one named "default" is used).
fn chat_template(dir: &Path, config_path: &Path, config: Option<&Map<String, Value>>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(t) => return Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&jinja, e)),
    }
    let bad = || Error::config(config_path, "chat_template", "expected a string or a list of {name, template}");
    match config.and_then(|c| c.get("chat_template")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(list)) => {
            let named = |name: Option<&str>| {
                list.iter().find(|t| name.is_none() || t.get("name").and_then(Value::as_str) == name)
            };
            let entry = named(Some("default")).or_else(|| named(None)).ok_or_else(bad)?;
            entry.get("template").and_then(Value::as_str).map(|s| Some(s.to_string())).ok_or_else(bad)
        }
        Some(_) => Err(bad()),
    }
}

impl Tokenizer {
    /// Loads the tokenizer files of a model folder (see the module docs).
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.join("tokenizer.model").exists() => {
                return Err(Error::Checkpoint {
                    path,
                    msg: "missing; the folder has only a SentencePiece tokenizer.model, which qlora-rt does not read \
                          (save the tokenizer with transformers to get tokenizer.json)"
                        .into(),
                })
            }
            Err(e) => return Err(Error::io(&path, e)),
        };
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::Checkpoint { path: path.clone(), msg: format!("not a valid tokenizer: {e}") })?;

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json(&config_path)?;
        let generation = GenerationConfig::load(dir)?;
        let chat_template = chat_template(dir, &config_path, config.as_ref())?;
        let cp = config_path.as_path();
        let special = |field: &str, fallback_id: Option<u32>| -> Result<Option<SpecialToken>> {
            let text = match &config {
                Some(c) => token_text(cp, c, field)?,
                None => None,
            };
            match text {
                Some(text) => match inner.token_to_id(&text) {
                    Some(id) => Ok(Some(SpecialToken { text, id })),
                    None => {
                        Err(Error::config(cp, field, format!("\"{text}\" is not in the vocabulary of tokenizer.json")))
                    }
                },
                None => Ok(fallback_id.and_then(|id| inner.id_to_token(id).map(|text| SpecialToken { text, id }))),
            }
        };
        let gen = &generation;
        let bos = special("bos_token", gen.bos_token_id)?;
        let eos = special("eos_token", gen.eos_token_ids.first().copied())?;
        let pad = special("pad_token", gen.pad_token_id)?;
        let (add_bos, add_eos) = match &config {
            Some(c) => (opt_bool(cp, c, "add_bos_token")?, opt_bool(cp, c, "add_eos_token")?),
            None => (None, None),
        };
        Ok(Tokenizer { inner, path, bos, eos, pad, add_bos, add_eos, chat_template, generation })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Text → ids. With `add_special_tokens`, tokenizer.json's post-processor adds what it adds (BOS for Llama
    /// and Gemma), and a BOS/EOS that tokenizer_config.json asks for (`add_bos_token`/`add_eos_token`) but the
    /// post-processor lacks is added too, as transformers' Llama tokenizers rebuild their post-processor from
    /// those flags. Without it, the text alone (chat templates write their own BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(|e| self.error("encoding", e))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens {
            if let (Some(true), Some(bos)) = (self.add_bos, &self.bos) {
                if ids.first() != Some(&bos.id) {
                    ids.insert(0, bos.id);
                }
            }
            if let (Some(true), Some(eos)) = (self.add_eos, &self.eos) {
                if ids.last() != Some(&eos.id) {
                    ids.push(eos.id);
                }
            }
        }
        Ok(ids)
    }

    /// Ids → text; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let n = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
            return Err(Error::Checkpoint {
                path: self.path.clone(),
                msg: format!("decoding: token id {bad} is outside the vocabulary ({n} tokens)"),
            });
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| self.error("decoding", e))
    }

    /// Ids that end generation: generation_config.json's eos ids (Llama 3 lists several), else the EOS token.
    pub fn stop_ids(&self) -> Vec<u32> {
        if !self.generation.eos_token_ids.is_empty() {
            return self.generation.eos_token_ids.clone();
        }
        self.eos.iter().map(|t| t.id).collect()
    }

    fn error(&self, what: &str, e: tokenizers::Error) -> Error {
        Error::Checkpoint { path: self.path.clone(), msg: format!("{what}: {e}") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama")
    }

    /// Ids from the Python `tokenizers` package on the same file (scripts/reference/tiny_models.py).
    #[test]
    fn fixture_tokenizer_matches_python_tokenizers() {
        let t = Tokenizer::load(&fixture()).unwrap();
        assert_eq!(t.vocab_size(), 101);
        let ids = |t: &Option<SpecialToken>| t.as_ref().map(|s| s.id);
        assert_eq!((ids(&t.pad), ids(&t.bos), ids(&t.eos)), (Some(0), Some(1), Some(2)));
        assert_eq!(t.bos.as_ref().unwrap().text, "<s>");
        let text = "hello world! the answer is 42.";
        let with = t.encode(text, true).unwrap();
        assert_eq!(with, vec![1, 49, 52, 53, 37, 72, 63, 34, 86, 56, 78, 65, 49, 80]);
        assert_eq!(t.encode(text, false).unwrap(), with[1..].to_vec());
        assert_eq!(t.decode(&with, true).unwrap(), text);
        assert_eq!(t.stop_ids(), vec![2]);
        assert!(t.chat_template.as_deref().unwrap().contains("<|im_start|>"));
        assert_eq!(t.generation.eos_token_ids, vec![2]);
        let e = t.decode(&[5, 101], false).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json") && e.contains("101"), "{e}");
    }

    #[test]
    fn config_flags_and_template_variants() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(fixture().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
        // No tokenizer_config.json: special tokens fall back to generation_config.json's ids.
        std::fs::write(dir.path().join("generation_config.json"), r#"{"bos_token_id":1,"eos_token_id":[2,5]}"#)
            .unwrap();
        let t = Tokenizer::load(dir.path()).unwrap();
        assert_eq!(t.bos, Some(SpecialToken { text: "<s>".into(), id: 1 }));
        assert_eq!(t.stop_ids(), vec![2, 5]);
        assert_eq!(t.chat_template, None);

        let cfg = r#"{"bos_token":{"__type":"AddedToken","content":"<s>"},"eos_token":"</s>","add_eos_token":true,
                      "chat_template":[{"name":"tool_use","template":"T"},{"name":"default","template":"D"}]}"#;
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg).unwrap();
        let t = Tokenizer::load(dir.path()).unwrap();
        assert_eq!(t.chat_template.as_deref(), Some("D"));
        let ids = t.encode("the", true).unwrap();
        assert_eq!((ids.first(), ids.last()), (Some(&1), Some(&2)), "{ids:?}");
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        assert_eq!(Tokenizer::load(dir.path()).unwrap().chat_template.as_deref(), Some("J"));
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        std::fs::write(dir.path().join("tokenizer.model"), b"spm").unwrap();
        let e = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("SentencePiece"), "{e}");
        std::fs::write(dir.path().join("tokenizer.json"), b"{\"version\": 3}").unwrap();
        let e = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer.json: not a valid tokenizer"), "{e}");
        std::fs::copy(fixture().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"bos_token":"<bos>"}"#).unwrap();
        let e = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer_config.json: bos_token") && e.contains("<bos>"), "{e}");
        std::fs::write(dir.path().join("tokenizer_config.json"), "{").unwrap();
        let e = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("tokenizer_config.json: invalid JSON"), "{e}");
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id":"x"}"#).unwrap();
        let e = Tokenizer::load(dir.path()).err().unwrap().to_string();
        assert!(e.contains("generation_config.json: eos_token_id"), "{e}");
    }
}
