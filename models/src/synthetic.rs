//! Models of a real architecture with random weights, built in memory without any file: what `qlora-rt bench`
//! trains to measure a step. A step's cost depends on the shapes and formats, not on the values, so the values only
//! have to keep activations finite and look like a trained checkpoint's to every kernel.
//!
//! - [`SHAPES`]: named architectures, each the `config.json` of its public checkpoint (the fields this crate reads),
//!   parsed by [`ModelConfig::parse`] like any model folder's.
//! - [`build`]: a [`CausalLm`] of a config with NF4 (or dense) base weights drawn as stored, no adapters.
//!
//! Owns nothing of the model itself: it fills the public types of [`crate::transformer`].

use crate::config::{Family, ModelConfig};
use crate::error::{Error, Result};
use crate::transformer::{BaseFormat, CausalLm, DecoderLayer, Mlp, Projection, SelfAttention};
use half::bf16;
use qlora_autograd::Param;
use qlora_runtime::nf4::{nf4_num_blocks, nf4_packed_len, quantize_absmax_nested, NestedAbsmax, DYNAMIC_MAP_SIGNED};
use qlora_runtime::quant::{Absmax, BaseWeight, Nf4Weight};
use qlora_runtime::Rng;
use qlora_runtime::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// A named architecture and the checkpoint its config comes from.
pub struct Shape {
    pub name: &'static str,
    /// The Hugging Face repository whose `config.json` this is.
    pub source: &'static str,
    config_json: &'static str,
}

impl Shape {
    const fn new(name: &'static str, source: &'static str, config_json: &'static str) -> Shape {
        Shape { name, source, config_json }
    }
}

/// Every built-in shape, its config in `models/shapes/<name>.json`: the public `config.json` values this crate reads
/// (token ids and the vision tower left out), kept as JSON so that it reads and diffs like the checkpoint's own.
pub const SHAPES: &[Shape] = &[
    Shape::new("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", include_str!("../shapes/smollm2-135m.json")),
    Shape::new("llama-3.2-1b", "meta-llama/Llama-3.2-1B", include_str!("../shapes/llama-3.2-1b.json")),
    Shape::new("llama-3-8b", "meta-llama/Meta-Llama-3-8B", include_str!("../shapes/llama-3-8b.json")),
    Shape::new("llama-3.1-70b", "meta-llama/Llama-3.1-70B", include_str!("../shapes/llama-3.1-70b.json")),
    Shape::new("gemma-2-2b", "google/gemma-2-2b", include_str!("../shapes/gemma-2-2b.json")),
    Shape::new("gemma-3-4b", "google/gemma-3-4b-pt (text_config)", include_str!("../shapes/gemma-3-4b.json")),
];

/// The names of [`SHAPES`], comma-separated (for help texts and errors).
pub fn shape_names() -> String {
    SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// The config of the built-in shape `name`; an unknown name is an error listing the known ones.
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    let Some(shape) = SHAPES.iter().find(|s| s.name == name) else {
        return Err(Error::Runtime(qlora_runtime::Error::invalid(
            "synthetic model",
            format!("unknown shape \"{name}\" (known: {})", shape_names()),
        )));
    };
    ModelConfig::parse(shape.config_json, Path::new(&format!("built-in shape {name}")))
}

/// Standard deviation of the random weights: transformers' `initializer_range` default, the value the peer
/// benchmarks' random checkpoints are drawn with.
const INIT_STD: f64 = 0.02;

/// Random values drawn per tensor at most; larger tensors repeat them. A 70B model's embeddings hold a billion
/// values, and drawing each would take longer than the benchmark, for no change in what any kernel does.
const DISTINCT_VALUES: usize = 1 << 22;

/// A [`CausalLm`] of `config` with random weights and no adapters: linear weights in `format` (NF4 drawn directly as
/// packed nibbles and block scales), embeddings, head and biases dense in `dense` (f32 for the CPU, the compute dtype
/// on a GPU, so nothing is converted on the way there), norms at their identity (1, or 0 under Gemma's 1 + w).
///
/// Projections of one shape share their host bytes (the values do not matter, and a 70B model's would not fit twice
/// in host memory); moving the model to a GPU gives each its own device copy, so device memory is a real model's.
pub fn build(config: &ModelConfig, format: BaseFormat, dense: DType, seed: u64) -> Result<CausalLm> {
    let c = config;
    let mut rng = Rng::new(seed);
    let mut bases: HashMap<[usize; 2], BaseWeight> = HashMap::new();
    let mut base = |rng: &mut Rng, shape: [usize; 2]| -> Result<BaseWeight> {
        if let Some(b) = bases.get(&shape) {
            return Ok(b.clone());
        }
        let b = match format {
            BaseFormat::Nf4 { blocksize, double_quant } => {
                BaseWeight::Nf4(random_nf4(rng, shape, blocksize, double_quant))
            }
            BaseFormat::Dense(dtype) => BaseWeight::Dense(random_dense(rng, &shape, dtype)?),
        };
        bases.insert(shape, b.clone());
        Ok(b)
    };
    let norm_value = if c.family == Family::Llama { 1.0 } else { 0.0 };
    let norm = |name: String, dim: usize| Param::frozen(name, Tensor::full(&[dim], norm_value, dense));
    let mut proj = |rng: &mut Rng, name: String, out: usize, inp: usize, bias: bool| -> Result<Projection> {
        let bias = bias.then(|| Param::frozen(format!("{name}.bias"), Tensor::zeros(&[out], dense)));
        Ok(Projection { base: base(rng, [out, inp])?, bias, adapter: None, name })
    };
    let (h, hd) = (c.hidden_size, c.head_dim);
    let (qo, kvo) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let sandwich = matches!(c.family, Family::Gemma2 | Family::Gemma3);
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let (ab, mb) = (c.attention_bias, c.mlp_bias);
        layers.push(DecoderLayer {
            input_layernorm: norm(format!("{p}.input_layernorm.weight"), h),
            post_attention_layernorm: norm(format!("{p}.post_attention_layernorm.weight"), h),
            pre_feedforward_layernorm: sandwich.then(|| norm(format!("{p}.pre_feedforward_layernorm.weight"), h)),
            post_feedforward_layernorm: sandwich.then(|| norm(format!("{p}.post_feedforward_layernorm.weight"), h)),
            self_attn: SelfAttention {
                q_proj: proj(&mut rng, format!("{p}.self_attn.q_proj"), qo, h, ab)?,
                k_proj: proj(&mut rng, format!("{p}.self_attn.k_proj"), kvo, h, ab)?,
                v_proj: proj(&mut rng, format!("{p}.self_attn.v_proj"), kvo, h, ab)?,
                o_proj: proj(&mut rng, format!("{p}.self_attn.o_proj"), h, qo, ab)?,
                q_norm: (c.family == Family::Gemma3).then(|| norm(format!("{p}.self_attn.q_norm.weight"), hd)),
                k_norm: (c.family == Family::Gemma3).then(|| norm(format!("{p}.self_attn.k_norm.weight"), hd)),
            },
            mlp: Mlp {
                gate_proj: proj(&mut rng, format!("{p}.mlp.gate_proj"), c.intermediate_size, h, mb)?,
                up_proj: proj(&mut rng, format!("{p}.mlp.up_proj"), c.intermediate_size, h, mb)?,
                down_proj: proj(&mut rng, format!("{p}.mlp.down_proj"), h, c.intermediate_size, mb)?,
            },
            kind: c.layer_kinds[i],
        });
    }
    let embed_tokens = Param::frozen("model.embed_tokens.weight", random_dense(&mut rng, &[c.vocab_size, h], dense)?);
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(Param::frozen("lm_head.weight", random_dense(&mut rng, &[c.vocab_size, h], dense)?))
    };
    Ok(CausalLm {
        config: config.clone(),
        embed_tokens,
        layers: Rc::new(layers),
        norm: norm("model.norm.weight".into(), h),
        lm_head,
        gradient_checkpointing: true,
        keep_layers: 0,
        offload_layers: 0,
        park_layers: 0,
        mlp_chunk_tokens: None,
        sharded: None,
    })
}

/// N(0, INIT_STD²) values in `dtype` (f32, bf16), at most [`DISTINCT_VALUES`] of them distinct.
fn random_dense(rng: &mut Rng, shape: &[usize], dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let distinct: Vec<f32> = (0..n.min(DISTINCT_VALUES)).map(|_| (INIT_STD * rng.normal()) as f32).collect();
    let values = || distinct.iter().copied().cycle().take(n);
    let t = match dtype {
        DType::F32 => Tensor::from_vec(values().collect::<Vec<f32>>(), shape),
        DType::BF16 => Tensor::from_vec(values().map(bf16::from_f32).collect::<Vec<bf16>>(), shape),
        other => {
            return Err(Error::Runtime(qlora_runtime::Error::DType {
                op: "synthetic weight",
                expected: DType::BF16,
                got: other,
            }))
        }
    };
    Ok(t?)
}

/// An NF4 weight as bitsandbytes would store a N(0, INIT_STD²) matrix: NF4's 16 codes are the quantiles of a
/// normal, so the codes of normal data are uniform, and uniform random nibbles are what such a weight holds. Each
/// block's scale is the block's largest |value|: over 64 normals that is about 2.42σ with a spread of about 0.35σ
/// (order statistics of |N(0, 1)|), drawn so (kept in [1.5σ, 4σ]).
fn random_nf4(rng: &mut Rng, shape: [usize; 2], blocksize: usize, double_quant: bool) -> Nf4Weight {
    let n = shape[0] * shape[1];
    let mut packed = vec![0u8; nf4_packed_len(n)];
    for chunk in packed.chunks_mut(8) {
        let bytes = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    let absmax: Vec<f32> = (0..nf4_num_blocks(n, blocksize))
        .map(|_| (INIT_STD * (2.42 + 0.35 * rng.normal()).clamp(1.5, 4.0)) as f32)
        .collect();
    let absmax = if double_quant && !absmax.is_empty() {
        let NestedAbsmax { offset, qabsmax, absmax2 } = quantize_absmax_nested(&absmax);
        Absmax::Nested { q: qabsmax, absmax2, offset, code: DYNAMIC_MAP_SIGNED.to_vec() }
    } else {
        Absmax::F32(absmax)
    };
    // bf16: the dtype of the checkpoints QLoRA quantizes, which bitsandbytes records as the weight's dtype.
    Nf4Weight { shape, blocksize, dtype: DType::BF16, packed: Arc::new(packed), absmax: Arc::new(absmax), device: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LayerKind;

    #[test]
    fn every_shape_parses_to_its_architecture() {
        for s in SHAPES {
            let c = shape_config(s.name).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(c.layer_kinds.len(), c.num_hidden_layers, "{}", s.name);
        }
        let g3 = shape_config("gemma-3-4b").unwrap();
        assert_eq!((g3.family, g3.head_dim, g3.sliding_window), (Family::Gemma3, 256, Some(1024)));
        assert_eq!(g3.layer_kinds.iter().filter(|k| **k == LayerKind::Full).count(), 5, "every sixth of 34 layers");
        assert_eq!(shape_config("llama-3.2-1b").unwrap().head_dim, 64);
        let e = shape_config("llama-9b").unwrap_err().to_string();
        assert!(e.contains("llama-9b") && e.contains("gemma-2-2b"), "{e}");
    }

    #[test]
    fn built_weights_are_finite_with_realistic_scales() {
        let mut c = shape_config("gemma-2-2b").unwrap();
        (c.num_hidden_layers, c.layer_kinds, c.vocab_size) = (2, c.layer_kinds[..2].to_vec(), 1000);
        (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) =
            (128, 256, 2, 1, 64);
        let m = build(&c, BaseFormat::Nf4 { blocksize: 64, double_quant: true }, DType::F32, 7).unwrap();
        assert!(m.lm_head.is_none(), "Gemma ties its head");
        assert!(m.layers[0].pre_feedforward_layernorm.is_some());
        let w = m.layers[1].mlp.down_proj.base.materialize(DType::F32).unwrap().to_vec::<f32>();
        assert_eq!(w.len(), 128 * 256);
        let std = (w.iter().map(|x| (x * x) as f64).sum::<f64>() / w.len() as f64).sqrt();
        assert!(w.iter().all(|x| x.is_finite()) && (0.015..0.035).contains(&std), "std {std}");
        let BaseWeight::Nf4(q) = &m.layers[0].self_attn.q_proj.base else { panic!("NF4 base expected") };
        assert!(matches!(*q.absmax, Absmax::Nested { .. }));
        let emb = m.embed_tokens.value().to_vec::<f32>();
        assert!(emb.iter().any(|&x| x != 0.0) && emb.iter().all(|x| x.abs() < 0.2));
    }
}
