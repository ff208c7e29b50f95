//! A tiny Llama trained from random initialisation on a synthetic task whose loss can only fall if attention works:
//! each sequence counts modulo the vocabulary with a per-sequence step, t[i+1] = (t\[i\] + s) mod V with
//! s ∈ {1, 2, 3}, so predicting token i+1 needs s, readable only by attending to earlier tokens.
//!
//! The model is the real decoder ([`CausalLm`]) built from a tiny config, trained the way `finetune` trains: the
//! projections are frozen NF4 (quantized from their random initialisation) under trainable LoRA adapters; the
//! embeddings, norms and head, which a fine-tune keeps frozen, train too, since nothing was pretrained. Sequences are
//! packed into one row with restarting positions (cu_seqlens), and each decoder layer runs under a gradient-checkpoint
//! scope, as real training does.

use crate::config::ModelConfig;
use crate::error::Result;
use crate::transformer::{Batch, CausalLm, Projection, Weights};
use qlora_autograd::{LoraAdapter, LoraConfig, Param, Tape, Var};
use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::quant::{BaseWeight, Nf4Weight};
use qlora_runtime::{nf4, DType, Device, Rng, Tensor};
use std::path::Path;

#[derive(Clone, Copy, Debug)]
pub struct ToyConfig {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub seq_len: usize,
    pub seqs_per_batch: usize,
}

impl Default for ToyConfig {
    fn default() -> Self {
        ToyConfig {
            vocab: 17,
            hidden: 32,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 64,
            seq_len: 12,
            seqs_per_batch: 8,
        }
    }
}

impl ToyConfig {
    /// The config.json of this toy Llama.
    fn model_config(&self) -> ModelConfig {
        let json = serde_json::json!({
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10_000.0,
            "tie_word_embeddings": false,
        });
        ModelConfig::parse(&json.to_string(), Path::new("toy config")).expect("the toy's sizes make a valid Llama")
    }
}

/// The adapters' hyperparameters: rank 8, alpha 16, as QLoRA recipes start.
fn lora_config() -> LoraConfig {
    LoraConfig { r: 8, alpha: 16.0, ..LoraConfig::default() }
}

/// A fresh initialisation: norms at one, embeddings N(0, 1), the head and the projections' bases as torch's
/// `nn.Linear` (U(−1/√in, 1/√in)), the bases then quantized to NF4 with double quantization and adapted.
struct Init {
    rng: Rng,
}

impl Init {
    fn linear(&mut self, out: usize, inp: usize) -> Tensor {
        let bound = 1.0 / (inp as f64).sqrt();
        Tensor::uniform(&[out, inp], -bound, bound, DType::F32, &mut self.rng)
    }
}

impl Weights for Init {
    fn param(&mut self, name: &str, shape: &[usize]) -> Result<Param> {
        let value = match name {
            "model.embed_tokens.weight" => Tensor::randn(shape, 1.0, DType::F32, &mut self.rng),
            "lm_head.weight" => self.linear(shape[0], shape[1]),
            _ => Tensor::ones(shape, DType::F32),
        };
        Ok(Param::trainable(name, value))
    }

    fn projection(&mut self, name: String, [out, inp]: [usize; 2], _bias: bool) -> Result<Projection> {
        let w = self.linear(out, inp);
        let base = BaseWeight::Nf4(Nf4Weight::quantize(&w, nf4::DEFAULT_BLOCKSIZE, true)?);
        let adapter = LoraAdapter::new(&name, &base, &lora_config(), &mut self.rng)?;
        Ok(Projection { name, base, bias: None, adapter: Some(adapter) })
    }

    fn has(&self, _: &str) -> bool {
        true
    }
}

pub struct ToyDecoder {
    cfg: ToyConfig,
    model: CausalLm,
}

impl ToyDecoder {
    pub fn new(cfg: ToyConfig, seed: u64) -> Self {
        let model = CausalLm::build(cfg.model_config(), &mut Init { rng: Rng::new(seed) })
            .expect("building from the toy's own config and initialisation");
        ToyDecoder { cfg, model }
    }

    pub fn config(&self) -> &ToyConfig {
        &self.cfg
    }

    /// The trained parameters: embeddings, head, norms and adapters.
    pub fn params(&self) -> Vec<Param> {
        let m = &self.model;
        let mut ps = vec![m.embed_tokens.clone(), m.norm.clone()];
        ps.extend(m.lm_head.clone());
        for l in m.layers.iter() {
            ps.extend([&l.input_layernorm, &l.post_attention_layernorm].map(Param::clone));
        }
        ps.extend(m.trainable_params());
        ps
    }

    /// A packed batch of counting sequences: (input ids, targets, positions, cu_seqlens), one row of
    /// seqs_per_batch × seq_len tokens. The first target of each sequence is ignored (−100) because it cannot
    /// be predicted; later ones can.
    pub fn sample_batch(&self, rng: &mut Rng) -> (Tensor, Tensor, Tensor, Tensor) {
        let (v, l, n) = (self.cfg.vocab, self.cfg.seq_len, self.cfg.seqs_per_batch);
        let (mut ids, mut targets, mut pos, mut cu) = (vec![], vec![], vec![], vec![0i32]);
        for _ in 0..n {
            let step = 1 + rng.below(3) as usize;
            let start = rng.below(v as u64) as usize;
            let seq: Vec<i32> = (0..=l).map(|i| ((start + i * step) % v) as i32).collect();
            ids.extend(&seq[..l]);
            targets.push(-100);
            targets.extend(&seq[2..=l]);
            pos.extend(0..l as i32);
            cu.push(cu.last().expect("starts with 0") + l as i32);
        }
        let t = |v: Vec<i32>| {
            let len = v.len();
            Tensor::from_vec(v, &[len]).expect("1-D")
        };
        (t(ids), t(targets), t(pos), t(cu))
    }

    /// Mean next-token loss over the non-ignored targets.
    pub fn loss(
        &self,
        tape: &Tape,
        ids: &Tensor,
        targets: &Tensor,
        positions: &Tensor,
        cu: &Tensor,
    ) -> qlora_runtime::Result<Var> {
        let cu_seqlens = SeqLens::new(&cu.values::<i32>(), Device::Cpu)?;
        let batch = Batch::new(ids.clone(), positions.clone(), cu_seqlens, targets.clone())?;
        let trained = batch.trained_tokens().max(1);
        self.model.loss(tape, &batch, trained as f64, 0)
    }
}
