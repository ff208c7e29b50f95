//! A tiny Llama-shaped decoder trained from random initialisation on a synthetic task whose loss can only fall
//! if attention works: each sequence counts modulo the vocabulary with a per-sequence step,
//! t[i+1] = (t[i] + s) mod V with s ∈ {1, 2, 3}, so predicting token i+1 needs s, readable only by attending
//! to earlier tokens. Sequences are packed into one row with restarting positions (cu_seqlens), and each
//! decoder layer runs under a gradient-checkpoint scope, as real training does.

use qlora_autograd::{AttentionParams, Glu, Param, Tape, Var};
use qlora_runtime::ops::nn::rope_tables;
use qlora_runtime::rope_inv_freq;
use qlora_runtime::Rng;
use qlora_runtime::{DType, Result, Tensor};
use std::rc::Rc;

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
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

struct Layer {
    input_layernorm: Param,
    q_proj: Param,
    k_proj: Param,
    v_proj: Param,
    o_proj: Param,
    post_attention_layernorm: Param,
    gate_proj: Param,
    up_proj: Param,
    down_proj: Param,
}

/// Per-batch inputs every layer reads.
struct Batch {
    cos: Tensor,
    sin: Tensor,
    cu_seqlens: Tensor,
}

pub struct ToyDecoder {
    cfg: ToyConfig,
    embed_tokens: Param,
    layers: Rc<Vec<Layer>>,
    norm: Param,
    lm_head: Param,
    inv_freq: Tensor,
}

fn linear_init(name: String, out: usize, inp: usize, rng: &mut Rng) -> Param {
    let bound = 1.0 / (inp as f64).sqrt();
    Param::trainable(name, Tensor::uniform(&[out, inp], -bound, bound, DType::F32, rng))
}

impl ToyDecoder {
    pub fn new(cfg: ToyConfig, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        let (h, hd) = (cfg.hidden, cfg.head_dim());
        let layers = (0..cfg.layers)
            .map(|i| {
                let n = |s: &str| format!("model.layers.{i}.{s}");
                Layer {
                    input_layernorm: Param::trainable(n("input_layernorm.weight"), Tensor::ones(&[h], DType::F32)),
                    q_proj: linear_init(n("self_attn.q_proj.weight"), cfg.heads * hd, h, &mut rng),
                    k_proj: linear_init(n("self_attn.k_proj.weight"), cfg.kv_heads * hd, h, &mut rng),
                    v_proj: linear_init(n("self_attn.v_proj.weight"), cfg.kv_heads * hd, h, &mut rng),
                    o_proj: linear_init(n("self_attn.o_proj.weight"), h, cfg.heads * hd, &mut rng),
                    post_attention_layernorm: Param::trainable(
                        n("post_attention_layernorm.weight"),
                        Tensor::ones(&[h], DType::F32),
                    ),
                    gate_proj: linear_init(n("mlp.gate_proj.weight"), cfg.intermediate, h, &mut rng),
                    up_proj: linear_init(n("mlp.up_proj.weight"), cfg.intermediate, h, &mut rng),
                    down_proj: linear_init(n("mlp.down_proj.weight"), h, cfg.intermediate, &mut rng),
                }
            })
            .collect();
        let inv_freq = Tensor::from_vec(rope_inv_freq::<f32>(hd, 10_000.0), &[hd / 2]).expect("head_dim/2 values");
        ToyDecoder {
            cfg,
            embed_tokens: Param::trainable(
                "model.embed_tokens.weight",
                Tensor::randn(&[cfg.vocab, h], 1.0, DType::F32, &mut rng),
            ),
            layers: Rc::new(layers),
            norm: Param::trainable("model.norm.weight", Tensor::ones(&[h], DType::F32)),
            lm_head: linear_init("lm_head.weight".into(), cfg.vocab, h, &mut rng),
            inv_freq,
        }
    }

    pub fn config(&self) -> &ToyConfig {
        &self.cfg
    }

    pub fn params(&self) -> Vec<Param> {
        let mut ps = vec![self.embed_tokens.clone(), self.norm.clone(), self.lm_head.clone()];
        for l in self.layers.iter() {
            ps.extend(
                [
                    &l.input_layernorm,
                    &l.q_proj,
                    &l.k_proj,
                    &l.v_proj,
                    &l.o_proj,
                    &l.post_attention_layernorm,
                    &l.gate_proj,
                    &l.up_proj,
                    &l.down_proj,
                ]
                .map(Param::clone),
            );
        }
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
    pub fn loss(&self, tape: &Tape, ids: &Tensor, targets: &Tensor, positions: &Tensor, cu: &Tensor) -> Result<Var> {
        let (cos, sin) = rope_tables(positions, &self.inv_freq)?;
        let batch = Rc::new(Batch { cos, sin, cu_seqlens: cu.clone() });
        let mut x = tape.embedding(&tape.param(&self.embed_tokens), ids)?;
        for i in 0..self.layers.len() {
            let (layers, batch, cfg) = (self.layers.clone(), batch.clone(), self.cfg);
            x = tape
                .checkpoint(&[&x], move |t, ins| Ok(vec![layer_forward(t, &cfg, &layers[i], &batch, &ins[0])?]))?
                .remove(0);
        }
        let x = tape.rms_norm(&x, &tape.param(&self.norm), 1e-6, 0.0)?;
        let logits = tape.linear(&x, &tape.param(&self.lm_head), None)?;
        let trained = targets.to_vec::<i32>().iter().filter(|&&t| t >= 0).count().max(1);
        tape.cross_entropy(&logits, targets, trained as f64)
    }
}

fn layer_forward(t: &Tape, cfg: &ToyConfig, l: &Layer, b: &Batch, x: &Var) -> Result<Var> {
    let (tokens, hd) = (x.shape()[0], cfg.head_dim());
    let p = AttentionParams {
        n_heads: cfg.heads,
        n_kv_heads: cfg.kv_heads,
        head_dim: hd,
        scale: 1.0 / (hd as f64).sqrt(),
        causal: true,
        sliding_window: None,
        softcap: None,
    };
    let h = t.rms_norm(x, &t.param(&l.input_layernorm), 1e-6, 0.0)?;
    let q = t.reshape(&t.linear(&h, &t.param(&l.q_proj), None)?, &[tokens, cfg.heads, hd])?;
    let k = t.reshape(&t.linear(&h, &t.param(&l.k_proj), None)?, &[tokens, cfg.kv_heads, hd])?;
    let v = t.reshape(&t.linear(&h, &t.param(&l.v_proj), None)?, &[tokens, cfg.kv_heads, hd])?;
    let (q, k) = (t.rope(&q, &b.cos, &b.sin)?, t.rope(&k, &b.cos, &b.sin)?);
    let a = t.attention(&p, &q, &k, &v, &b.cu_seqlens, &b.cu_seqlens)?;
    let a = t.reshape(&a, &[tokens, cfg.heads * hd])?;
    let x = t.add(x, &t.linear(&a, &t.param(&l.o_proj), None)?)?;
    let h = t.rms_norm(&x, &t.param(&l.post_attention_layernorm), 1e-6, 0.0)?;
    let gate = t.linear(&h, &t.param(&l.gate_proj), None)?;
    let up = t.linear(&h, &t.param(&l.up_proj), None)?;
    let m = t.glu(Glu::SwiGlu, &gate, &up)?;
    t.add(&x, &t.linear(&m, &t.param(&l.down_proj), None)?)
}
