//! A Hugging Face tokenizer (`tokenizer.json` + `tokenizer_config.json`) → the `tokenizer.*` GGUF metadata, the
//! inverse of [`super::tokenizer`]. Two kinds of BPE tokenizer.json are written:
//! - byte-level BPE (a `ByteLevel` pre-tokenizer): `tokenizer.ggml.model` = `gpt2`, the merges as `"a b"`
//!   strings, and `tokenizer.ggml.pre` named from the pre-tokenizer's structure, which stands in for the hash of
//!   a test string's ids that `convert_hf_to_gguf.py`'s `get_vocab_base_pre` compares: a lone `ByteLevel` is
//!   `gpt2`, individual digits then `ByteLevel` is `smollm`, Llama 3's split regex is `llama-bpe`;
//! - SentencePiece-style BPE (`▁` for space, a `Metaspace` pre-tokenizer or a `Replace` normalizer):
//!   `tokenizer.ggml.model` = `llama`. GGUF keeps scores, not merges, and llama.cpp merges the adjacent pair
//!   whose joined token scores highest, so a token made by merge number r scores −r (earlier merges first);
//!   tokens no merge makes score below every merge. (gguf-py's `LlamaHfVocab` writes −1000 for every token,
//!   which loses the merge order.) `add_space_prefix` follows the pre-tokenizer's prepend scheme.
//!
//! Token types as llama.cpp's converter assigns them: special added tokens, and added tokens that look special
//! (`does_token_look_special`: `<|…|>`, `<unused…>`, `<pad>`, `<mask>`, …), control (3), other added tokens
//! user-defined (4), the unknown token 2 unless it is an added token (SmolLM2's and Gemma's are control),
//! `<0xNN>` byte tokens 6 when the model falls back to bytes, ids the tokenizer lacks below the embedding size
//! `[PAD{id}]` unused (5), the rest normal (1). The unknown token is `model.unk_token`, else
//! tokenizer_config.json's `unk_token` (where gguf-py's `SpecialVocab` finds it).
//!
//! llama.cpp matches control and user-defined tokens against the raw text and prints them verbatim, so the
//! converter writes them pre-normalized: in a SentencePiece-style vocabulary a user-defined token's `▁` becomes
//! a space (Gemma's whitespace-run tokens 138–167), the inverse of what [`super::tokenizer`] does on import.

use super::metadata::{MetaArray, MetaValue};
use super::tokenizer::LLAMA3_SPLIT;
use crate::error::{Error, Result};
use crate::formats::tokenizer::Tokenizer;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

fn err(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::config(path, field, msg)
}

/// `tokenizer.ggml.pre` for a byte-level pre-tokenizer, from its structure (see the module docs).
fn byte_level_pre(pre: &Value) -> Option<&'static str> {
    let ty = |v: &Value| v["type"].as_str().unwrap_or_default().to_string();
    let byte_level = |v: &Value, regex: bool| ty(v) == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex;
    if byte_level(pre, true) {
        return Some("gpt2");
    }
    let parts = pre["pretokenizers"].as_array().filter(|_| ty(pre) == "Sequence")?;
    match parts.as_slice() {
        [digits, bl] if ty(digits) == "Digits" && digits["individual_digits"] == true && byte_level(bl, true) => {
            Some("smollm")
        }
        [split, bl]
            if ty(split) == "Split"
                && split["pattern"]["Regex"].as_str() == Some(LLAMA3_SPLIT)
                && byte_level(bl, false) =>
        {
            Some("llama-bpe")
        }
        _ => None,
    }
}

/// Whether a SentencePiece-style tokenizer adds `▁` before the text: a Metaspace pre-tokenizer whose scheme is
/// not "never", or a Prepend normalizer (transformers' legacy Llama tokenizer.json).
fn space_prefix(tj: &Value) -> bool {
    let pre = &tj["pre_tokenizer"];
    let metaspace = |v: &Value| v["type"] == "Metaspace" && v["prepend_scheme"].as_str().unwrap_or("always") != "never";
    let in_seq =
        |v: &Value, key: &str, f: &dyn Fn(&Value) -> bool| f(v) || v[key].as_array().is_some_and(|a| a.iter().any(f));
    in_seq(pre, "pretokenizers", &metaspace) || in_seq(&tj["normalizer"], "normalizers", &|v| v["type"] == "Prepend")
}

fn is_sentencepiece(tj: &Value) -> bool {
    let metaspace = |v: &Value| {
        v["type"] == "Metaspace"
            || v["pretokenizers"].as_array().is_some_and(|a| a.iter().any(|x| x["type"] == "Metaspace"))
    };
    let replaces_space = |v: &Value| {
        let one = |x: &Value| x["type"] == "Replace" && x["content"] == "\u{2581}";
        one(v) || v["normalizers"].as_array().is_some_and(|a| a.iter().any(one))
    };
    metaspace(&tj["pre_tokenizer"]) || replaces_space(&tj["normalizer"])
}

/// The converter's `does_token_look_special`: added tokens some models fail to mark special.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The unknown token's text: `model.unk_token` of tokenizer.json, else `unk_token` of tokenizer_config.json
/// (a string or an added-token object).
fn unknown_token(dir: &Path, model: &Value) -> Result<Option<String>> {
    if let Some(t) = model["unk_token"].as_str() {
        return Ok(Some(t.to_string()));
    }
    let path = dir.join("tokenizer_config.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
    let config: Value = serde_json::from_str(&text).map_err(|e| Error::json(&path, &e))?;
    let unk = &config["unk_token"];
    Ok(unk.as_str().or_else(|| unk["content"].as_str()).map(str::to_string))
}

/// The `tokenizer.*` metadata of the model folder `dir`, for an embedding of `n_vocab` rows.
pub fn metadata(dir: &Path, n_vocab: usize) -> Result<Vec<(String, MetaValue)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let tj: Value = serde_json::from_str(&text).map_err(|e| Error::json(&path, &e))?;
    let tok = Tokenizer::load(dir)?;
    let model = &tj["model"];
    if model["type"] != "BPE" {
        return Err(err(
            &path,
            "model.type",
            format!("{} tokenizers cannot be written as GGUF (BPE can)", model["type"]),
        ));
    }
    let p = path.as_path();

    // Tokens by id: the BPE vocabulary, then the added tokens.
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut types = vec![UNUSED; n_vocab];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = usize::try_from(id).ok().filter(|&i| i < n_vocab).ok_or_else(|| {
            err(p, "model.vocab", format!("token {text:?} has id {id}, outside the {n_vocab}-row embedding"))
        })?;
        tokens[slot] = Some(text.to_string());
        types[slot] = ty;
        Ok(())
    };
    let vocab = model["vocab"].as_object().ok_or_else(|| err(p, "model.vocab", "expected an object"))?;
    let byte_fallback = model["byte_fallback"].as_bool().unwrap_or(false);
    let is_byte =
        |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok();
    for (t, id) in vocab {
        let id = id.as_u64().ok_or_else(|| err(p, "model.vocab", format!("{t:?}: id {id} is not an integer")))?;
        place(id, t, if byte_fallback && is_byte(t) { BYTE } else { NORMAL })?;
    }
    for a in tj["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            return Err(err(p, "added_tokens", format!("entry without an id and content: {a}")));
        };
        let control = a["special"] == true || looks_special(content);
        place(id, content, if control { CONTROL } else { USER_DEFINED })?;
    }
    let unk = unknown_token(dir, model)?.and_then(|t| tok.token_to_id(&t));
    if let Some(u) = unk.filter(|&u| types[u as usize] == NORMAL) {
        types[u as usize] = UNKNOWN;
    }
    let tokens: Vec<String> =
        tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();

    let merges: Vec<String> = match model["merges"].as_array() {
        None => vec![],
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) if pair.len() == 2 && pair.iter().all(|x| x.is_string()) => {
                    Ok(format!("{} {}", pair[0].as_str().unwrap_or_default(), pair[1].as_str().unwrap_or_default()))
                }
                _ => Err(err(p, &format!("model.merges[{i}]"), format!("expected two tokens, got {m}"))),
            })
            .collect::<Result<_>>()?,
    };

    let mut md: Vec<(String, MetaValue)> = Vec::new();
    let mut put = |k: &str, v: MetaValue| md.push((k.to_string(), v));
    if byte_level_pre(&tj["pre_tokenizer"]).is_some() || tj["decoder"]["type"] == "ByteLevel" {
        let pre = byte_level_pre(&tj["pre_tokenizer"]).ok_or_else(|| {
            err(
                p,
                "pre_tokenizer",
                "a byte-level pre-tokenizer llama.cpp does not name (gpt2, smollm, llama-bpe are written)",
            )
        })?;
        put("tokenizer.ggml.model", MetaValue::Str("gpt2".into()));
        put("tokenizer.ggml.pre", MetaValue::Str(pre.into()));
        put("tokenizer.ggml.tokens", MetaValue::Array(MetaArray::Str(tokens)));
        put("tokenizer.ggml.token_type", MetaValue::Array(MetaArray::I32(types)));
        put("tokenizer.ggml.merges", MetaValue::Array(MetaArray::Str(merges)));
    } else if is_sentencepiece(&tj) {
        let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        let written: Vec<String> = tokens
            .iter()
            .zip(&types)
            .map(|(t, &ty)| if ty == USER_DEFINED { t.replace('\u{2581}', " ") } else { t.clone() })
            .collect();
        let mut scores: Vec<f32> = (0..tokens.len()).map(|i| -((merges.len() + i) as f32)).collect();
        let mut made = vec![false; tokens.len()];
        for (rank, m) in merges.iter().enumerate() {
            if let Some(&id) = index.get(m.replacen(' ', "", 1).as_str()) {
                if !made[id] {
                    made[id] = true;
                    scores[id] = -(rank as f32);
                }
            }
        }
        put("tokenizer.ggml.model", MetaValue::Str("llama".into()));
        put("tokenizer.ggml.pre", MetaValue::Str("default".into()));
        put("tokenizer.ggml.tokens", MetaValue::Array(MetaArray::Str(written)));
        put("tokenizer.ggml.scores", MetaValue::Array(MetaArray::F32(scores)));
        put("tokenizer.ggml.token_type", MetaValue::Array(MetaArray::I32(types)));
        put("tokenizer.ggml.add_space_prefix", MetaValue::Bool(space_prefix(&tj)));
    } else {
        return Err(err(
            p,
            "pre_tokenizer",
            "neither byte-level (ByteLevel) nor SentencePiece-style (Metaspace, or a ▁ Replace normalizer) BPE",
        ));
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", tok.bos.as_ref().map(|t| t.id)),
        ("tokenizer.ggml.eos_token_id", tok.eos.as_ref().map(|t| t.id)),
        ("tokenizer.ggml.unknown_token_id", unk),
        ("tokenizer.ggml.padding_token_id", tok.pad.as_ref().map(|t| t.id)),
    ] {
        if let Some(id) = id {
            put(key, MetaValue::U32(id));
        }
    }
    // What encoding with special tokens adds, when tokenizer_config.json does not say.
    let with = tok.encode("a", true)?;
    let without = tok.encode("a", false)?;
    let adds = |t: &Option<crate::formats::tokenizer::SpecialToken>, at_start: bool| {
        t.as_ref().is_some_and(|t| {
            with.len() > without.len() && if at_start { with.first() } else { with.last() } == Some(&t.id)
        })
    };
    put("tokenizer.ggml.add_bos_token", MetaValue::Bool(tok.add_bos.unwrap_or_else(|| adds(&tok.bos, true))));
    put("tokenizer.ggml.add_eos_token", MetaValue::Bool(tok.add_eos.unwrap_or_else(|| adds(&tok.eos, false))));
    if let Some(t) = &tok.chat_template {
        put("tokenizer.chat_template", MetaValue::Str(t.clone()));
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The tiny Gemma 3 fixture's tokenizer (101 tokens) with added tokens `▁▁` (id 101, not special) and
    /// `<unused0>` (id 102, not special, but looks it), and `<unk>` (id 3) no longer an added token when
    /// `unk_added` is false; returns the metadata as a map.
    fn vocab(unk_added: bool) -> HashMap<String, MetaValue> {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/gemma3");
        let dir = tempfile::tempdir().unwrap();
        let mut tj: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("tokenizer.json")).unwrap()).unwrap();
        let added = tj["added_tokens"].as_array_mut().unwrap();
        if !unk_added {
            added.retain(|a| a["content"] != "<unk>");
        }
        for (id, content) in [(101, "\u{2581}\u{2581}"), (102, "<unused0>")] {
            added.push(json!({"id": id, "content": content, "special": false, "normalized": false,
                              "single_word": false, "lstrip": false, "rstrip": false}));
        }
        let v = tj["model"]["vocab"].as_object_mut().unwrap();
        v.insert("\u{2581}\u{2581}".into(), json!(101));
        v.insert("<unused0>".into(), json!(102));
        std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
        std::fs::copy(fixture.join("tokenizer_config.json"), dir.path().join("tokenizer_config.json")).unwrap();
        metadata(dir.path(), 103).unwrap().into_iter().collect()
    }

    #[test]
    fn user_defined_spaces_are_pre_normalized_and_types_follow_the_converter() {
        let md = vocab(true);
        let (MetaValue::Array(MetaArray::Str(tokens)), MetaValue::Array(MetaArray::I32(types))) =
            (&md["tokenizer.ggml.tokens"], &md["tokenizer.ggml.token_type"])
        else {
            panic!("tokens and types are arrays")
        };
        assert_eq!((tokens[101].as_str(), types[101]), ("  ", USER_DEFINED));
        assert_eq!((tokens[102].as_str(), types[102]), ("<unused0>", CONTROL));
        // A vocabulary token keeps its ▁; the unknown token, an added special token here, stays control.
        assert!(tokens[..101].iter().any(|t| t.starts_with('\u{2581}')));
        assert_eq!((tokens[3].as_str(), types[3]), ("<unk>", CONTROL));
        assert_eq!(md["tokenizer.ggml.unknown_token_id"], MetaValue::U32(3));
        // Only in the vocabulary, it is typed unknown.
        let md = vocab(false);
        let MetaValue::Array(MetaArray::I32(types)) = &md["tokenizer.ggml.token_type"] else { panic!("types") };
        assert_eq!(types[3], UNKNOWN);
    }
}
