//! GGUF (llama.cpp's model format) import and export. Import: the container ([`reader`], its key/values as
//! [`metadata`] values), ggml's quantized types dequantized to f32 ([`dequant`]), llama.cpp's tensor names and
//! layout back to Hugging Face's ([`mapping`]), and the tokenizer metadata as Hugging Face tokenizer files
//! ([`tokenizer`]); writing the Hugging Face folder is the caller's (`qlora-rt import`). Export ([`export`]): a
//! Hugging Face folder as one GGUF file, through the quantizers ([`quant`]), the tokenizer files as metadata
//! ([`hf_vocab`]) and the container writer ([`writer`]); merging an adapter first is the caller's
//! (`qlora-rt export-gguf`).

pub mod dequant;
pub mod export;
pub mod ftype;
pub mod hf_vocab;
pub mod mapping;
pub mod metadata;
pub mod quant;
pub mod reader;
pub mod tokenizer;
pub mod writer;

pub use dequant::{dequantize, GgmlType};
pub use mapping::{HfTensor, Hyper};
pub use metadata::{MetaArray, MetaValue};
pub use reader::{GgufFile, TensorInfo};

use crate::error::Result;
use serde_json::Value;

/// Everything a Hugging Face model folder needs, derived from one GGUF file; the tensors are read on demand
/// ([`HfTensor::load`]) so that a caller can stream them out one at a time.
pub struct HfImport {
    pub hyper: Hyper,
    pub config: Value,
    pub generation_config: Value,
    pub tokenizer: Value,
    pub tokenizer_config: Value,
    /// In GGUF file order.
    pub tensors: Vec<HfTensor>,
}

impl HfImport {
    /// Maps `file` to Hugging Face; `torch_dtype` is what config.json says the weights are stored in.
    pub fn new(file: &GgufFile, torch_dtype: &str) -> Result<Self> {
        let hyper = Hyper::read(file)?;
        let tensors = mapping::plan(file, &hyper)?;
        let config = mapping::config_json(file, &hyper, torch_dtype)?;
        let tok = tokenizer::GgufTokenizer::read(file)?;
        let max_length = config["max_position_embeddings"].as_u64().unwrap_or(2048);
        Ok(HfImport {
            tokenizer: tok.tokenizer_json()?,
            tokenizer_config: tok.tokenizer_config_json(max_length)?,
            generation_config: tok.generation_config_json(),
            hyper,
            config,
            tensors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::reader::tests::Builder;
    use super::*;
    use crate::config::ModelConfig;
    use std::path::Path;

    /// 0, 1, 2, ... as f32 bytes.
    fn f32s(n: usize) -> Vec<u8> {
        (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect()
    }

    /// A one-layer Llama (hidden 8, 2 heads of 4, 1 KV head, MLP 16, vocab 4) with a byte-level tokenizer;
    /// `skip` leaves a tensor out and `extra` adds one.
    fn tiny_llama(arch: &str, pre: &str, skip: &str, extra: Option<(&str, &[u64])>) -> Builder {
        let mut b = Builder::default();
        b.kv_str("general.architecture", arch)
            .kv_u32("llama.embedding_length", 8)
            .kv_u32("llama.block_count", 1)
            .kv_u32("llama.feed_forward_length", 16)
            .kv_u32("llama.attention.head_count", 2)
            .kv_u32("llama.attention.head_count_kv", 1)
            .kv_u32("llama.context_length", 64)
            .kv_f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
            .kv_f32("llama.rope.freq_base", 10000.0)
            .kv_str("tokenizer.ggml.model", "gpt2")
            .kv_str("tokenizer.ggml.pre", pre)
            .kv_strs("tokenizer.ggml.tokens", &["a", "b", "ab", "<s>"])
            .kv_strs("tokenizer.ggml.merges", &["a b"])
            .kv_u32("tokenizer.ggml.bos_token_id", 3)
            .kv_u32("tokenizer.ggml.eos_token_id", 3);
        let tensors: [(&str, &[u64]); 11] = [
            ("token_embd.weight", &[8, 4]),
            ("output_norm.weight", &[8]),
            ("blk.0.attn_norm.weight", &[8]),
            ("blk.0.attn_q.weight", &[8, 8]),
            ("blk.0.attn_k.weight", &[8, 4]),
            ("blk.0.attn_v.weight", &[8, 4]),
            ("blk.0.attn_output.weight", &[8, 8]),
            ("blk.0.ffn_norm.weight", &[8]),
            ("blk.0.ffn_gate.weight", &[8, 16]),
            ("blk.0.ffn_up.weight", &[8, 16]),
            ("blk.0.ffn_down.weight", &[16, 8]),
        ];
        for (name, dims) in tensors.into_iter().filter(|&(n, _)| n != skip).chain(extra) {
            let n = dims.iter().product::<u64>() as usize;
            b.tensor(name, dims, 0, &f32s(n));
        }
        b
    }

    fn import(b: &Builder) -> Result<HfImport> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, b.bytes(3)).unwrap();
        let file = GgufFile::open(&path)?;
        let import = HfImport::new(&file, "float32")?;
        // Every tensor dequantizes, q and k with their rows unpermuted.
        for t in &import.tensors {
            assert_eq!(t.load(&file)?.len(), t.shape.iter().product::<usize>(), "{}", t.name);
        }
        let q = import.tensors.iter().find(|t| t.name.ends_with("q_proj.weight")).unwrap().load(&file)?;
        // Head 0's stored rows 0, 1, 2, 3 (each 8 values, 0..31) are HF rows 0, 2, 1, 3.
        assert_eq!((q[0], q[8], q[16], q[24]), (0.0, 16.0, 8.0, 24.0));
        Ok(import)
    }

    #[test]
    fn tiny_llama_maps_to_hugging_face() {
        let import = import(&tiny_llama("llama", "gpt2", "", None)).unwrap();
        let names: Vec<&str> = import.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.contains(&"model.layers.0.post_attention_layernorm.weight"), "{names:?}");
        assert!(names.contains(&"model.embed_tokens.weight") && !names.contains(&"lm_head.weight"));
        let c = &import.config;
        assert_eq!((c["rms_norm_eps"].as_f64(), c["rope_theta"].as_f64()), (Some(1e-5), Some(1e4)));
        assert_eq!((c["tie_word_embeddings"].as_bool(), c["vocab_size"].as_u64()), (Some(true), Some(4)));
        let parsed = ModelConfig::parse(&c.to_string(), Path::new("config.json")).unwrap();
        assert_eq!((parsed.num_key_value_heads, parsed.head_dim, parsed.bos_token_id), (1, 4, Some(3)));
        assert_eq!(import.tokenizer["model"]["merges"], serde_json::json!([["a", "b"]]));
        assert_eq!(import.tokenizer["model"]["vocab"]["ab"], 2);
        assert_eq!(import.tokenizer_config["bos_token"], "<s>");
        assert_eq!(import.generation_config["eos_token_id"], 3);
    }

    #[test]
    fn unmappable_files_name_the_tensor_or_key() {
        let err = |b: Builder| import(&b).err().expect("import fails").to_string();
        let e = err(tiny_llama("llama", "gpt2", "blk.0.ffn_up.weight", None));
        assert!(e.contains("tensor blk.0.ffn_up.weight: missing"), "{e}");
        let e = err(tiny_llama("llama", "gpt2", "", Some(("blk.0.attn_sinks.weight", &[2]))));
        assert!(e.contains("tensor blk.0.attn_sinks.weight: has no Hugging Face counterpart"), "{e}");
        let e = err(tiny_llama("llama", "gpt2", "", Some(("blk.3.attn_norm.weight", &[8]))));
        assert!(e.contains("layer 3 of a 1-layer model"), "{e}");
        let e = err(tiny_llama("llama", "gpt2", "blk.0.attn_k.weight", Some(("blk.0.attn_k.weight", &[8, 8]))));
        assert!(e.contains("tensor blk.0.attn_k.weight: shape [8, 8], expected [4, 8]"), "{e}");
        let e = err(tiny_llama("gpt2", "gpt2", "", None));
        assert!(e.contains("general.architecture: \"gpt2\" is not supported"), "{e}");
        let e = err(tiny_llama("llama", "qwen2", "", None));
        assert!(e.contains("tokenizer.ggml.pre: pre-tokenizer \"qwen2\" is not supported"), "{e}");
    }
}
