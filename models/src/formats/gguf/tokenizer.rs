//! The tokenizer stored in GGUF metadata (`tokenizer.ggml.*`) → Hugging Face `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json`, built as JSON directly.
//!
//! Two models, written as transformers' own GGUF tokenizer conversion writes them (`integrations/gguf/
//! gguf_tokenizer_mapping.py`, transformers 5), which the tests use as their oracle:
//! - `gpt2`: byte-level BPE with explicit merges; the tokens are already in GPT-2's byte-to-unicode alphabet
//!   (`Ġ` for space); the split regex is the one `tokenizer.ggml.pre` names (llama.cpp's `llama-vocab.cpp`).
//! - `llama`: SentencePiece BPE with byte fallback and `▁` for space. GGUF keeps scores, not merges, so the
//!   merges are recovered as transformers' `generate_merges` does: every split of a token into two tokens,
//!   highest-scoring token first, then longer left part first. Gemma files need two fixes transformers also
//!   makes: tokens of spaces are stored with real spaces and are respelled with `▁`, and their scores do not
//!   follow the merge order, so the file order is used instead.
//!
//! Token types are llama.cpp's: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte. Control and
//! unknown tokens become special added tokens, user-defined ones plain added tokens (matched whole).

use super::metadata::MetaArray;
use super::reader::GgufFile;
use crate::error::Result;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

const NORMAL: i64 = 1;
const UNKNOWN: i64 = 2;
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The split regex of Llama 3's tokenizer.json (llama.cpp's `llama-bpe` pre-tokenizer).
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Elements in an array value, whatever their type.
pub(crate) fn array_len(a: &MetaArray) -> usize {
    match a {
        MetaArray::U8(v) => v.len(),
        MetaArray::I8(v) => v.len(),
        MetaArray::U16(v) => v.len(),
        MetaArray::I16(v) => v.len(),
        MetaArray::U32(v) => v.len(),
        MetaArray::I32(v) => v.len(),
        MetaArray::F32(v) => v.len(),
        MetaArray::Bool(v) => v.len(),
        MetaArray::Str(v) => v.len(),
        MetaArray::Array(v) => v.len(),
        MetaArray::U64(v) => v.len(),
        MetaArray::I64(v) => v.len(),
        MetaArray::F64(v) => v.len(),
    }
}

/// The tokenizer metadata of one file, validated.
pub struct GgufTokenizer<'a> {
    file: &'a GgufFile,
    model: &'a str,
    /// Gemma 1/2/3 (see the module docs).
    gemma: bool,
    tokens: Vec<String>,
    /// One type per token (all normal when the file has none).
    types: Vec<i64>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

fn str_array<'a>(file: &'a GgufFile, key: &str) -> Result<Option<&'a [String]>> {
    match file.get_array(key)? {
        None => Ok(None),
        Some(MetaArray::Str(v)) => Ok(Some(v)),
        Some(_) => Err(file.key_error(key, "expected an array of strings")),
    }
}

/// An array of numbers of any width, as f64 (token types and scores).
fn num_array(file: &GgufFile, key: &str) -> Result<Option<Vec<f64>>> {
    fn widen<T: Copy + Into<f64>>(v: &[T]) -> Vec<f64> {
        v.iter().map(|&x| x.into()).collect()
    }
    Ok(Some(match file.get_array(key)? {
        None => return Ok(None),
        Some(MetaArray::I32(v)) => widen(v),
        Some(MetaArray::U32(v)) => widen(v),
        Some(MetaArray::I8(v)) => widen(v),
        Some(MetaArray::U8(v)) => widen(v),
        Some(MetaArray::I16(v)) => widen(v),
        Some(MetaArray::U16(v)) => widen(v),
        Some(MetaArray::F32(v)) => widen(v),
        Some(MetaArray::F64(v)) => v.clone(),
        Some(_) => return Err(file.key_error(key, "expected an array of numbers")),
    }))
}

impl<'a> GgufTokenizer<'a> {
    pub fn read(file: &'a GgufFile) -> Result<Self> {
        let model_key = "tokenizer.ggml.model";
        let model = file.get_str(model_key)?.ok_or_else(|| file.key_error(model_key, "missing"))?;
        if !matches!(model, "gpt2" | "llama") {
            return Err(file.key_error(model_key, format!("\"{model}\" is not supported (gpt2, llama are)")));
        }
        let tokens_key = "tokenizer.ggml.tokens";
        let tokens = str_array(file, tokens_key)?.ok_or_else(|| file.key_error(tokens_key, "missing"))?;
        let arch = file.get_str("general.architecture")?.unwrap_or_default();
        let gemma = model == "llama" && matches!(arch, "gemma" | "gemma2" | "gemma3");
        let tokens: Vec<String> = if gemma {
            let respell = |t: &String| {
                if t.contains(' ') && t.trim().is_empty() {
                    "\u{2581}".repeat(t.chars().count())
                } else {
                    t.clone()
                }
            };
            tokens.iter().map(respell).collect()
        } else {
            tokens.to_vec()
        };
        let types = match num_array(file, "tokenizer.ggml.token_type")? {
            Some(t) if t.len() == tokens.len() => t.into_iter().map(|x| x as i64).collect(),
            Some(t) => {
                return Err(file
                    .key_error("tokenizer.ggml.token_type", format!("{} types for {} tokens", t.len(), tokens.len())))
            }
            None => vec![NORMAL; tokens.len()],
        };
        let id = |key: &str| -> Result<Option<u32>> {
            match file.get_u64(key)? {
                Some(i) if (i as usize) < tokens.len() => Ok(Some(i as u32)),
                Some(i) => Err(file.key_error(key, format!("token id {i} is outside the {} tokens", tokens.len()))),
                None => Ok(None),
            }
        };
        Ok(GgufTokenizer {
            file,
            model,
            gemma,
            types,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            eot: id("tokenizer.ggml.eot_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            // llama.cpp's defaults: SentencePiece models add BOS, byte-level BPE models do not.
            add_bos: file.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama"),
            add_eos: file.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
            tokens,
        })
    }

    fn text(&self, id: Option<u32>) -> Option<&str> {
        id.map(|i| self.tokens[i as usize].as_str())
    }

    /// Token → id; a token listed twice keeps its last id, as llama.cpp's and transformers' maps do.
    fn ids(&self) -> HashMap<&str, usize> {
        self.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect()
    }

    fn vocab(&self) -> Map<String, Value> {
        self.ids().into_iter().map(|(t, i)| (t.to_string(), json!(i))).collect()
    }

    /// Control, unknown and user-defined tokens, matched whole before the model runs.
    fn added_tokens(&self) -> Vec<Value> {
        let mut added = Vec::new();
        for (i, (t, &ty)) in self.tokens.iter().zip(&self.types).enumerate() {
            if matches!(ty, UNKNOWN | CONTROL | USER_DEFINED) {
                added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                                  "normalized": false, "special": ty != USER_DEFINED}));
            }
        }
        added
    }

    /// BOS/EOS around each sequence, as the GGUF's add_bos/add_eos flags ask.
    fn template_processor(&self) -> Option<Value> {
        let special = |id: Option<u32>, on: bool| if on { self.text(id).zip(id) } else { None };
        let (bos, eos) = (special(self.bos, self.add_bos), special(self.eos, self.add_eos));
        if bos.is_none() && eos.is_none() {
            return None;
        }
        let seq = |name: &str, type_id: u32| {
            let mut v = Vec::new();
            if let Some((t, _)) = bos {
                v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
            }
            v.push(json!({"Sequence": {"id": name, "type_id": type_id}}));
            if let Some((t, _)) = eos {
                v.push(json!({"SpecialToken": {"id": t, "type_id": type_id}}));
            }
            v
        };
        let mut specials = Map::new();
        for (t, id) in bos.into_iter().chain(eos) {
            specials.insert(t.into(), json!({"id": t, "ids": [id], "tokens": [t]}));
        }
        let pair = [seq("A", 0), seq("B", 1)].concat();
        Some(json!({"type": "TemplateProcessing", "single": seq("A", 0), "pair": pair, "special_tokens": specials}))
    }

    /// Byte-level BPE: merges from the file, the pre-tokenizer `tokenizer.ggml.pre` names.
    fn gpt2(&self) -> Result<Value> {
        let key = "tokenizer.ggml.merges";
        let merges = str_array(self.file, key)?.ok_or_else(|| self.file.key_error(key, "missing"))?;
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !b.contains(' ') => Ok(json!([a, b])),
                _ => Err(self.file.key_error(&format!("{key}[{i}]"), format!("\"{m}\" is not two tokens"))),
            })
            .collect::<Result<Vec<Value>>>()?;
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre_key = "tokenizer.ggml.pre";
        let pre = self.file.get_str(pre_key)?.unwrap_or("default");
        // llama.cpp's regexes per `pre` (llama-vocab.cpp) and the Hugging Face pre-tokenizers that split alike.
        let (pre_tokenizer, ignore_merges) = match pre {
            "gpt2" => (byte_level(true), false),
            "smollm" | "starcoder" | "refact" | "codeshell" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                false,
            ),
            "llama-bpe" | "llama3" => (
                json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
                    byte_level(false)]}),
                true,
            ),
            other => {
                return Err(self.file.key_error(
                    pre_key,
                    format!("pre-tokenizer \"{other}\" is not supported (gpt2, smollm, starcoder, refact, codeshell, llama-bpe are)"),
                ))
            }
        };
        let byte_level_post =
            json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true});
        let post = match self.template_processor() {
            Some(t) => json!({"type": "Sequence", "processors": [byte_level_post, t]}),
            None => byte_level_post,
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": ignore_merges, "vocab": self.vocab(), "merges": merges},
        }))
    }

    /// SentencePiece BPE: merges recovered from the scores (Gemma: from the file order).
    fn sentencepiece(&self) -> Result<Value> {
        let key = "tokenizer.ggml.scores";
        let scores = if self.gemma {
            (0..self.tokens.len()).map(|i| -(i as f64)).collect()
        } else {
            let scores = num_array(self.file, key)?.ok_or_else(|| self.file.key_error(key, "missing"))?;
            if scores.len() != self.tokens.len() {
                let msg = format!("{} scores for {} tokens", scores.len(), self.tokens.len());
                return Err(self.file.key_error(key, msg));
            }
            scores
        };
        let merges = spm_merges(&self.tokens, &scores);
        // Gemma files say false (llama.cpp's converter writes it so); others default to llama.cpp's true.
        let prefix = self.file.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(!self.gemma);
        // transformers' GemmaTokenizer replaces spaces in a normalizer; its LlamaTokenizer uses Metaspace, which
        // adds the prefix `▁` to the first piece of text only.
        let (normalizer, pre_tokenizer) = if self.gemma && !prefix {
            (json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}), Value::Null)
        } else {
            let scheme = if prefix { "first" } else { "never" };
            (
                Value::Null,
                json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false}),
            )
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added_tokens(),
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.template_processor(),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": self.text(self.unk),
                      "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                      "byte_fallback": true, "ignore_merges": false, "vocab": self.vocab(),
                      "merges": merges.into_iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()},
        }))
    }

    /// `tokenizer.json`.
    pub fn tokenizer_json(&self) -> Result<Value> {
        if self.model == "gpt2" {
            self.gpt2()
        } else {
            self.sentencepiece()
        }
    }

    /// `tokenizer_config.json`: special tokens, BOS/EOS policy, the chat template.
    pub fn tokenizer_config_json(&self, model_max_length: u64) -> Result<Value> {
        let mut c = Map::new();
        c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        c.insert("add_bos_token".into(), json!(self.add_bos));
        c.insert("add_eos_token".into(), json!(self.add_eos));
        for (field, id) in
            [("bos_token", self.bos), ("eos_token", self.eos), ("pad_token", self.pad), ("unk_token", self.unk)]
        {
            if let Some(t) = self.text(id) {
                c.insert(field.into(), json!(t));
            }
        }
        if let Some(t) = self.file.get_str("tokenizer.chat_template")? {
            c.insert("chat_template".into(), json!(t));
        }
        c.insert("clean_up_tokenization_spaces".into(), json!(false));
        c.insert("model_max_length".into(), json!(model_max_length));
        Ok(Value::Object(c))
    }

    /// `generation_config.json`: generation stops at EOS, or at end-of-turn when the file names a separate one.
    pub fn generation_config_json(&self) -> Value {
        let mut c = Map::new();
        if let Some(b) = self.bos {
            c.insert("bos_token_id".into(), json!(b));
        }
        match (self.eos, self.eot) {
            (Some(e), Some(t)) if e != t => c.insert("eos_token_id".into(), json!([e, t])),
            (Some(e), _) | (None, Some(e)) => c.insert("eos_token_id".into(), json!(e)),
            (None, None) => None,
        };
        if let Some(p) = self.pad {
            c.insert("pad_token_id".into(), json!(p));
        }
        Value::Object(c)
    }
}

/// Merges of a SentencePiece BPE vocabulary (transformers' `generate_merges`): every split of a token into two
/// tokens, ordered by the token's score, highest first, then by the length of the left and right parts,
/// longest first, and otherwise in vocabulary order.
fn spm_merges<'t>(tokens: &'t [String], scores: &[f64]) -> Vec<(&'t str, &'t str)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        first.entry(t.as_str()).or_insert(i);
    }
    let mut merges: Vec<(f64, &str, &str)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        // A token listed twice is merged once, where first listed, with the score of its last listing.
        if first[piece.as_str()] != id {
            continue;
        }
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if ids.contains_key(l) && ids.contains_key(r) {
                merges.push((scores[ids[piece.as_str()]], l, r));
            }
        }
    }
    // A stable sort keeps vocabulary order among equal keys.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.len().cmp(&a.1.len())).then(b.2.len().cmp(&a.2.len())));
    merges.into_iter().map(|(_, l, r)| (l, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentencepiece_merges_follow_scores_then_split_lengths() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "abc", "bc"].iter().map(|s| s.to_string()).collect();
        // "bc" scores above "ab": it merges first; "abc" splits as ab+c (longer left part first) and a+bc.
        let scores = [0.0, -1.0, -2.0, -3.0, -5.0, -6.0, -4.0];
        let merges = spm_merges(&tokens, &scores);
        assert_eq!(merges, vec![("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]);
    }
}
