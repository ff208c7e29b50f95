//! One decoder layer's forward (attention, then the MLP, with the norms and residual adds each family places), as
//! the model runs it for training (where checkpointing runs it again in backward), evaluation and generation (with a
//! KV cache). Owns what a layer reads besides its weights ([`LayerInputs`]) and which copy of the layer runs
//! ([`LayerRef`]: the model's own, or one gathered from the ranks of a sharded model).

use crate::config::{Activation, Family, LayerKind, ModelConfig};
use crate::decoder::{DecoderLayer, Projection};
use crate::kv_cache::LayerKv;
use crate::sharded::ShardedBase;
use qlora_autograd::{AttentionParams, Glu, Tape, Var};
use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::profile::{self, Pass};
use qlora_runtime::Tensor;
use std::rc::Rc;

/// Everything a layer's forward reads besides its input, shared by all layers of one batch.
pub(crate) struct LayerInputs {
    pub cu_seqlens: SeqLens,
    /// (cos, sin) for full-attention layers and for sliding layers (they differ only for Gemma 3).
    pub rope_full: (Tensor, Tensor),
    pub rope_local: (Tensor, Tensor),
    /// The adapters' dropout seed; None runs them as peft's eval mode does, without dropout (every cached forward:
    /// inference never drops).
    pub dropout_seed: Option<u64>,
    /// Tokens of a block when the MLP runs a block at a time (`CausalLm::mlp_chunk_tokens`).
    pub mlp_chunk: Option<usize>,
    pub sharded: Option<Rc<ShardedBase>>,
}

/// The layer a forward runs: the model's own, or a sharded model's, gathered whole for this run of it (freed when
/// the run and the backward it records no longer hold it).
#[derive(Clone)]
pub(crate) enum LayerRef {
    Own(Rc<Vec<DecoderLayer>>, usize),
    Gathered(Rc<DecoderLayer>),
}

impl LayerRef {
    /// Layer `index`; a sharded model's is gathered, the gather of layer `next` (expected to run next) started.
    pub(crate) fn of(
        layers: &Rc<Vec<DecoderLayer>>,
        index: usize,
        sharded: Option<&ShardedBase>,
        next: Option<usize>,
    ) -> qlora_runtime::Result<Self> {
        Ok(match sharded {
            Some(s) => LayerRef::Gathered(Rc::new(s.gather(index, &layers[index], next)?)),
            None => LayerRef::Own(layers.clone(), index),
        })
    }
}

impl std::ops::Deref for LayerRef {
    type Target = DecoderLayer;

    fn deref(&self) -> &DecoderLayer {
        match self {
            LayerRef::Own(layers, index) => &layers[*index],
            LayerRef::Gathered(layer) => layer,
        }
    }
}

pub(crate) fn norm_offset(family: Family) -> f64 {
    if family == Family::Llama {
        0.0
    } else {
        1.0
    }
}

/// One decoder layer (`layers[index]`). With `kv`, the layer's keys and values join its cache and attention runs over
/// all of them.
pub(crate) fn layer_forward(
    t: &Tape,
    c: &ModelConfig,
    layers: &Rc<Vec<DecoderLayer>>,
    index: usize,
    inp: &LayerInputs,
    x: &Var,
    kv: Option<&mut LayerKv>,
) -> qlora_runtime::Result<Var> {
    let (x, m) = layer_unsummed(t, c, layers, index, inp, (x, None), kv)?;
    t.add(&x, &m)
}

/// [`layer_forward`] on the residual stream x plus `pending` (the previous layer's MLP output, not yet added: this
/// layer's first norm adds it in the same launch), returning the stream and this layer's MLP output unsummed, for
/// the next layer's norm (or the final one) to add. Decoding runs a few tokens through every layer, where each
/// launch saved is ~2 µs of a layer's ~130.
pub(crate) fn layer_unsummed(
    t: &Tape,
    c: &ModelConfig,
    layers: &Rc<Vec<DecoderLayer>>,
    index: usize,
    inp: &LayerInputs,
    (x, pending): (&Var, Option<&Var>),
    kv: Option<&mut LayerKv>,
) -> qlora_runtime::Result<(Var, Var)> {
    let _profile = profile::scope(Pass::Forward, "decoder layer");
    // Forward runs the layers up, backward's recomputes down: the one expected next is gathered under this one.
    let next = if t.recomputing() { index.checked_sub(1) } else { Some(index + 1) };
    let l = LayerRef::of(layers, index, inp.sharded.as_deref(), next)?;
    let (tokens, hd) = (x.shape()[0], c.head_dim);
    let offset = norm_offset(c.family);
    let eps = c.rms_norm_eps;
    let seed = |k: u64| layer_seed(inp.dropout_seed, index, k);
    let a = &l.self_attn;

    let qkv = [(&a.q_proj, seed(0)), (&a.k_proj, seed(1)), (&a.v_proj, seed(2))];
    let norm = (&l.input_layernorm, eps, offset);
    let (x, [q, k, v]) = Projection::forward_group_after_norm(t, (x, pending), norm, qkv)?;
    let mut q = t.reshape(&q, &[tokens, c.num_attention_heads, hd])?;
    let mut k = t.reshape(&k, &[tokens, c.num_key_value_heads, hd])?;
    let v = t.reshape(&v, &[tokens, c.num_key_value_heads, hd])?;
    if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
        q = t.rms_norm(&q, &t.param(qn), eps, offset)?;
        k = t.rms_norm(&k, &t.param(kn), eps, offset)?;
    }
    let (cos, sin) = if l.kind == LayerKind::Sliding { &inp.rope_local } else { &inp.rope_full };
    let p = AttentionParams {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: hd,
        scale: c.attention_scale,
        causal: true,
        sliding_window: if l.kind == LayerKind::Sliding { c.sliding_window } else { None },
        softcap: c.attn_logit_softcapping,
    };
    let (q, k, v, cu_seqlens_k) = match kv {
        // The keys are rotated on their way into the cache (with v's copy, one launch for a sequence on a GPU).
        Some(kv) => {
            let (q, k, v, cu) = kv.extend_rotated([q.value(), k.value(), v.value()], (cos, sin), &inp.cu_seqlens)?;
            (Var::constant(q), Var::constant(k), Var::constant(v), cu)
        }
        None => {
            let (q, k) = t.rope_qk(&q, &k, cos, sin)?;
            (q, k, v, inp.cu_seqlens.clone())
        }
    };
    let attn = t.attention(&p, &q, &k, &v, &inp.cu_seqlens, &cu_seqlens_k)?;
    let attn = t.reshape(&attn, &[tokens, c.num_attention_heads * hd])?;
    let mut attn = a.o_proj.forward(t, &attn, seed(3))?;
    // Gemma 2/3 sandwich: post_attention_layernorm normalises the attention output before the residual add and
    // pre_feedforward_layernorm feeds the MLP; Llama and Gemma 1 feed the MLP through post_attention_layernorm.
    let ff_norm = match &l.pre_feedforward_layernorm {
        Some(pre) => {
            attn = t.rms_norm(&attn, &t.param(&l.post_attention_layernorm), eps, offset)?;
            pre
        }
        None => &l.post_attention_layernorm,
    };
    match inp.mlp_chunk {
        // A block at a time, each its own checkpoint (inside the layer's recompute, a block's MLP activations live
        // only while that block's backward runs).
        Some(chunk) if tokens > chunk => {
            let (x, h) = t.add_rms_norm(&x, &attn, &t.param(ff_norm), eps, offset)?;
            let blocks = t.split_rows(&h, chunk)?;
            let mut outs = Vec::with_capacity(blocks.len());
            for (b, block) in blocks.iter().enumerate() {
                let (layer, cfg, dropout_seed) = (l.clone(), c.clone(), inp.dropout_seed);
                // Each block draws its own dropout masks (a mask is a function of the seed and the element index).
                let seed = dropout_seed.map(|s| s ^ (b as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
                let mlp = move |t: &Tape, ins: &[Var]| Ok(vec![mlp_forward(t, &cfg, &layer, index, &ins[0], seed)?]);
                // In the layer's recompute a block's output only reaches the layer's (unread) output through the
                // concatenation and the residual add: the block runs once, in its own backward, not here too.
                let out = if t.recomputing() {
                    t.checkpoint_unread(&[block], &[(block.shape(), block.value().dtype())], mlp)?
                } else {
                    t.checkpoint(&[block], mlp)?
                };
                outs.push(out.into_iter().next().expect("one output per block"));
            }
            Ok((x, t.cat_rows(&outs)?))
        }
        _ => {
            let gate_up = mlp_gate_up(&l, index, inp.dropout_seed);
            let (x, [gate, up]) =
                Projection::forward_group_after_norm(t, (&x, Some(&attn)), (ff_norm, eps, offset), gate_up)?;
            Ok((x, mlp_down(t, c, &l, index, (&gate, &up), inp.dropout_seed)?))
        }
    }
}

/// The MLP of layer `index` (`l`) on a block of normed hidden states h: gate and up, the GLU, down, and Gemma 2/3's
/// post-feedforward norm.
fn mlp_forward(
    t: &Tape,
    c: &ModelConfig,
    l: &DecoderLayer,
    index: usize,
    h: &Var,
    dropout_seed: Option<u64>,
) -> qlora_runtime::Result<Var> {
    let [gate, up] = Projection::forward_group(t, h, mlp_gate_up(l, index, dropout_seed))?;
    mlp_down(t, c, l, index, (&gate, &up), dropout_seed)
}

/// The MLP's gate and up projections of layer `index` with their dropout seeds.
fn mlp_gate_up(l: &DecoderLayer, index: usize, dropout_seed: Option<u64>) -> [(&Projection, Option<u64>); 2] {
    let seed = |k: u64| layer_seed(dropout_seed, index, k);
    [(&l.mlp.gate_proj, seed(4)), (&l.mlp.up_proj, seed(5))]
}

/// The MLP of layer `index` after gate and up: the GLU, down, and Gemma 2/3's post-feedforward norm.
fn mlp_down(
    t: &Tape,
    c: &ModelConfig,
    l: &DecoderLayer,
    index: usize,
    (gate, up): (&Var, &Var),
    dropout_seed: Option<u64>,
) -> qlora_runtime::Result<Var> {
    let seed = |k: u64| layer_seed(dropout_seed, index, k);
    let glu = match c.activation {
        Activation::Silu => Glu::SwiGlu,
        Activation::GeluTanh => Glu::GeGlu,
    };
    // The GLU and down_proj run as one op, which keeps gate and up but not their product, the largest activation
    // of a layer. Recomputed for backward, the MLP's result reaches the checkpoint's output (a layer's or an MLP
    // block's) only through adds and the blocks' concatenation, which read no values: down_proj records its gradients
    // and computes nothing until backward (not its products, a third of the MLP's GEMMs, nor the GLU). Gemma 2/3
    // normalize it first, and the norm's backward reads it: recomputed, their product is formed here anyway and
    // lives only until this layer's backward, so the two ops keep it rather than form it again there.
    let down = &l.mlp.down_proj;
    let m = match (t.recomputing(), l.post_feedforward_layernorm.is_some()) {
        (true, true) => down.forward(t, &t.glu(glu, gate, up)?, seed(6))?,
        (recomputing, _) => down.forward_glu(t, (glu, gate, up), seed(6), recomputing)?,
    };
    match &l.post_feedforward_layernorm {
        Some(n) => t.rms_norm(&m, &t.param(n), c.rms_norm_eps, norm_offset(c.family)),
        None => Ok(m),
    }
}

/// The dropout seed of projection `k` of layer `index`: distinct, reproducible streams per layer and projection.
fn layer_seed(dropout_seed: Option<u64>, index: usize, k: u64) -> Option<u64> {
    dropout_seed.map(|s| s ^ ((index as u64) << 8 | k).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
