//! Llama and Gemma (1, 2, 3 text) decoders, written with the autograd ops and named as transformers names
//! them (`model.layers.{i}.self_attn.q_proj`, ...), so checkpoint keys map one to one.
//!
//! Differences between the families are data, read from [`ModelConfig`]: the norm offset (Gemma's 1 + w),
//! the embedding scale, the MLP activation, sandwich norms (Gemma 2/3), q/k norms (Gemma 3), attention scale
//! and softcapping, sliding-window layers and per-layer rope bases. One layer's forward is `layer.rs`'s; this file
//! holds the model, its loading and moving, and the passes over its layers.

use crate::config::{Family, ModelConfig};
use crate::decoder::{blocks, frozen_to};
use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use crate::kv_cache::KvCache;
use crate::layer::{layer_forward, layer_unsummed, norm_offset, LayerInputs, LayerRef};
use crate::rope::inv_freq;
use crate::sharded::ShardedBase;
use qlora_autograd::{Param, Tape, Var};
use qlora_runtime::dist::Communicator;
use qlora_runtime::memory::{tagged, Category};
use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::ops::linear_cross_entropy::linear_cross_entropy_op;
use qlora_runtime::ops::rope::rope_tables;
use qlora_runtime::profile::{self, Pass};
use qlora_runtime::quant::{BaseWeight, Nf4Weight};
use qlora_runtime::{DType, Device, Tensor};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

pub use crate::batch::Batch;
pub use crate::decoder::{DecoderLayer, Mlp, Projection, SelfAttention};

/// How frozen linear weights are held after loading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BaseFormat {
    /// Dense in this dtype (plain LoRA; f32 for parity tests).
    Dense(DType),
    /// NF4 (QLoRA), quantized as each tensor streams in.
    Nf4 { blocksize: usize, double_quant: bool },
}

/// `f` over the seven projections of a layer, in order, stopping at the first error.
fn try_map7<T, U, E>(items: [T; 7], f: impl FnMut(T) -> std::result::Result<U, E>) -> std::result::Result<[U; 7], E> {
    let v = items.into_iter().map(f).collect::<std::result::Result<Vec<U>, E>>()?;
    Ok(v.try_into().unwrap_or_else(|_| unreachable!("seven items in, seven out")))
}

/// A causal language model: embeddings, decoder layers, final norm, head.
pub struct CausalLm {
    pub config: ModelConfig,
    pub embed_tokens: Param,
    pub layers: Rc<Vec<DecoderLayer>>,
    pub norm: Param,
    /// None when tied to `embed_tokens`.
    pub lm_head: Option<Param>,
    /// Recompute each decoder layer in backward instead of keeping its activations (on by default).
    pub gradient_checkpointing: bool,
    /// Under checkpointing, the last `keep_layers` decoder layers keep their activations and are not recomputed:
    /// what a memory budget affords beyond the checkpoints (0 by default; the results are the same bits).
    pub keep_layers: usize,
    /// Under checkpointing, the inputs of the first `offload_layers` recomputed layers (in forward order, parked ones
    /// aside; at most all of them) wait for backward in pinned host memory instead of on the GPU, each copied back one
    /// layer ahead (`Tape::checkpoint_offloaded`); the other recomputed layers keep theirs on the device. 0 by default;
    /// the same bits whatever the count, since offloading only moves bytes. On the CPU it changes nothing. The first
    /// layers are the ones to offload: backward reaches them last, so at every point of backward fewer inputs are left
    /// on the device than with any other choice of as many layers (the later layers' inputs, whose backward comes
    /// first, are freed by then), their copies out and back hide under the most compute, and they form one chain from
    /// layer 0 in which each layer's backward prefetches the previous layer's input.
    pub offload_layers: usize,
    /// Under checkpointing, this many of the layers checkpointing would recompute keep their activations instead,
    /// parked in pinned host memory from their forward to their backward (`Tape::parked`): no recompute, at the cost
    /// of copying the activations out and back over the host link under the other layers' compute. They are spread
    /// evenly over the recomputed layers, the last of them included (its activations stay on the device: its backward
    /// comes first), so that each copy has the layers up to the next parked one to run under. 0 by default; the same
    /// bits whatever the count, since parking only moves bytes. On the CPU they are simply kept.
    pub park_layers: usize,
    /// Run each layer's MLP this many tokens at a time, each block its own checkpoint, so that a layer's backward
    /// holds one block's MLP activations instead of the whole sequence's (what long contexts need: the MLP's
    /// intermediate is the widest activation). None (the default) runs it whole. The values are the same but for
    /// the order of the adapters' gradient sums over tokens; with adapter dropout each block draws its own masks.
    pub mlp_chunk_tokens: Option<usize>,
    /// The decoder layers' NF4 weights split across the ranks of a group, gathered a layer at a time as it runs
    /// ([`CausalLm::load_sharded`], [`CausalLm::shard`]); None (the default) when every weight is here whole.
    pub sharded: Option<Rc<ShardedBase>>,
}

/// Where [`CausalLm::build`] takes each weight from: a checkpoint ([`CausalLm::from_checkpoint`]) or a fresh
/// initialisation (the `toy` model).
pub trait Weights {
    /// The embeddings, a norm or the head, named as transformers names it (`model.norm.weight`).
    fn param(&mut self, name: &str, shape: &[usize]) -> Result<Param>;
    /// A decoder projection: its module path, [out, in], and whether it has a bias.
    fn projection(&mut self, name: String, shape: [usize; 2], bias: bool) -> Result<Projection>;
    /// Whether the weight `name` exists (a tied head may be stored or not).
    fn has(&self, name: &str) -> bool;
}

/// A checkpoint's weights: norms, embeddings, head and biases frozen in f32 for CPU compute, linear weights as
/// `format` asks.
struct Loaded<'a> {
    ck: &'a Checkpoint,
    format: BaseFormat,
}

impl Weights for Loaded<'_> {
    fn param(&mut self, name: &str, shape: &[usize]) -> Result<Param> {
        Ok(Param::frozen(name, self.ck.load_shaped(name, shape)?.to_dtype(DType::F32)))
    }

    fn projection(&mut self, name: String, [out, inp]: [usize; 2], bias: bool) -> Result<Projection> {
        let ck = self.ck;
        let prequantized = crate::formats::bnb::load_linear(ck, &name, [out, inp])?;
        let base = match (prequantized, self.format) {
            // A 4-bit bitsandbytes checkpoint loads as saved, never requantized (dequantized only for Dense).
            (Some(w), BaseFormat::Nf4 { .. }) => BaseWeight::Nf4(w),
            (Some(w), BaseFormat::Dense(dtype)) => BaseWeight::Dense(w.dequantize(DType::F32)?.to_dtype(dtype)),
            (None, BaseFormat::Dense(dtype)) => {
                BaseWeight::Dense(ck.load_shaped(&format!("{name}.weight"), &[out, inp])?.to_dtype(dtype))
            }
            (None, BaseFormat::Nf4 { blocksize, double_quant }) => {
                let tensor = format!("{name}.weight");
                let w = ck.load_shaped(&tensor, &[out, inp])?;
                BaseWeight::Nf4(
                    Nf4Weight::quantize(&w, blocksize, double_quant)
                        .map_err(|e| ck.tensor_error(&tensor, e.to_string()))?,
                )
            }
        };
        let bias = if bias { Some(self.param(&format!("{name}.bias"), &[out])?) } else { None };
        Ok(Projection { name, base, bias, adapter: None })
    }

    fn has(&self, name: &str) -> bool {
        self.ck.contains(name)
    }
}

impl CausalLm {
    /// Loads a Hugging Face model folder (config.json + safetensors), quantizing linear weights to NF4 as they
    /// stream in when asked. Norms and embeddings are kept in f32 for CPU compute.
    ///
    /// ```
    /// use qlora_autograd::Tape;
    /// use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
    /// use qlora_runtime::nf4::DEFAULT_BLOCKSIZE;
    ///
    /// let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama");
    /// let model = CausalLm::load(&dir, BaseFormat::Nf4 { blocksize: DEFAULT_BLOCKSIZE, double_quant: true })?;
    /// assert_eq!(model.projections().len(), 2 * 7); // q, k, v, o, gate, up, down in each of 2 layers
    /// let batch = Batch::pack(&[(vec![1, 5, 9, 2], vec![1, 5, 9, 2])])?;
    /// let tape = Tape::new();
    /// let logits = tape.no_grad(|| model.logits(&tape, &batch, 0))?;
    /// assert_eq!(logits.shape(), [4, model.config.vocab_size]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn load(dir: &Path, format: BaseFormat) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &ck, format)
    }

    pub fn from_checkpoint(config: ModelConfig, ck: &Checkpoint, format: BaseFormat) -> Result<Self> {
        Self::build(config, &mut Loaded { ck, format })
    }

    /// [`CausalLm::load`] as one rank of `group`, the decoder's NF4 weights sharded across the ranks
    /// ([`crate::sharded`]), this rank's shards on `device`: each layer is split as soon as it is loaded, so this
    /// rank's host holds one layer whole at most. Every rank of the group loads the same folder, in step.
    pub fn load_sharded(dir: &Path, format: BaseFormat, group: Arc<dyn Communicator>, device: Device) -> Result<Self> {
        let config = ModelConfig::load(dir)?;
        let ck = Checkpoint::open(dir)?;
        Self::assemble(config, &mut Loaded { ck: &ck, format }, Some(ShardedBase::new(group, device)))
    }

    /// This model's decoder NF4 weights sharded across the ranks of `group`, this rank's shards on `device`, as
    /// [`CausalLm::load_sharded`] loads them (for a model built whole).
    pub fn shard(&mut self, group: Arc<dyn Communicator>, device: Device) -> Result<()> {
        if self.sharded.is_some() {
            return Err(Error::Runtime(qlora_runtime::Error::invalid("shard", "the model is sharded already")));
        }
        let mut sharded = ShardedBase::new(group, device);
        let layers = Rc::get_mut(&mut self.layers).ok_or_else(|| {
            Error::Runtime(qlora_runtime::Error::invalid("shard", "layers are shared by a forward still in flight"))
        })?;
        for layer in layers {
            sharded.take_layer(layer)?;
        }
        self.sharded = Some(Rc::new(sharded));
        Ok(())
    }

    /// The model `config` describes, every weight taken from `weights`, in checkpoint order (layer by layer, then
    /// embeddings, head and final norm). Gradient checkpointing is on.
    pub fn build(config: ModelConfig, weights: &mut impl Weights) -> Result<Self> {
        Self::assemble(config, weights, None)
    }

    /// [`CausalLm::build`], each decoder layer given to `sharded` as soon as it is built when there is one.
    fn assemble(config: ModelConfig, weights: &mut impl Weights, mut sharded: Option<ShardedBase>) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let gemma_sandwich = matches!(c.family, Family::Gemma2 | Family::Gemma3);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut norm = |suffix: &str, dim: usize| weights.param(&format!("{p}.{suffix}.weight"), &[dim]);
            let input_layernorm = norm("input_layernorm", h)?;
            let post_attention_layernorm = norm("post_attention_layernorm", h)?;
            let pre_feedforward_layernorm = gemma_sandwich.then(|| norm("pre_feedforward_layernorm", h)).transpose()?;
            let post_feedforward_layernorm =
                gemma_sandwich.then(|| norm("post_feedforward_layernorm", h)).transpose()?;
            let projections =
                try_map7(c.layer_projections(i), |(name, shape, bias)| weights.projection(name, shape, bias))?;
            let mut qk_norm = |suffix: &str| {
                (c.family == Family::Gemma3).then(|| weights.param(&format!("{p}.{suffix}.weight"), &[hd])).transpose()
            };
            let (self_attn, mlp) = blocks(projections, qk_norm("self_attn.q_norm")?, qk_norm("self_attn.k_norm")?);
            let mut layer = DecoderLayer {
                input_layernorm,
                post_attention_layernorm,
                pre_feedforward_layernorm,
                post_feedforward_layernorm,
                self_attn,
                mlp,
                kind: c.layer_kinds[i],
            };
            if let Some(s) = &mut sharded {
                s.take_layer(&mut layer)?;
            }
            layers.push(layer);
        }
        let embed_tokens = weights.param("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let lm_head = if c.tie_word_embeddings && !weights.has("lm_head.weight") {
            None
        } else {
            Some(weights.param("lm_head.weight", &[c.vocab_size, h])?)
        };
        let norm = weights.param("model.norm.weight", &[h])?;
        Ok(CausalLm {
            config,
            embed_tokens,
            layers: Rc::new(layers),
            norm,
            lm_head,
            gradient_checkpointing: true,
            keep_layers: 0,
            offload_layers: 0,
            park_layers: 0,
            mlp_chunk_tokens: None,
            sharded: sharded.map(Rc::new),
        })
    }

    /// This model on `device`, computing in `dtype` there: embeddings, norms, the head, biases and dense bases are
    /// converted to `dtype` (bf16 on CUDA is the design's compute precision; f32 for parity checks), NF4 bases are
    /// uploaded packed and dequantized on the device per use, and adapters keep their f32 master values (every op
    /// casts them to the activations' dtype for its products, so a bf16 model trains f32 adapters from bf16
    /// products). Adapter parameters are new `Param`s on the device, without gradients; the original model is
    /// untouched. Batches go to the same device with [`Batch::to_device`].
    pub fn to_device(&self, device: Device, dtype: DType) -> Result<CausalLm> {
        tagged(Category::Weights, || {
            let mut moved = self.map(|p| frozen_to(p, device, dtype), |p| p.to_device(device, dtype))?;
            moved.sharded = self.sharded.as_ref().map(|s| s.to_device(device).map(Rc::new)).transpose()?;
            Ok(moved)
        })
    }

    /// A model of the same shape whose embeddings, norms and head are `frozen(p)` and whose projections are
    /// `projection(p)`, layer by layer: what a copy on another device or with other adapters is built from.
    pub(crate) fn map(
        &self,
        frozen: impl Fn(&Param) -> qlora_runtime::Result<Param>,
        mut projection: impl FnMut(&Projection) -> qlora_runtime::Result<Projection>,
    ) -> Result<CausalLm> {
        let opt = |p: &Option<Param>| p.as_ref().map(&frozen).transpose();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let projections = try_map7(l.projections(), &mut projection)?;
                let (self_attn, mlp) = blocks(projections, opt(&l.self_attn.q_norm)?, opt(&l.self_attn.k_norm)?);
                Ok(DecoderLayer {
                    input_layernorm: frozen(&l.input_layernorm)?,
                    post_attention_layernorm: frozen(&l.post_attention_layernorm)?,
                    pre_feedforward_layernorm: opt(&l.pre_feedforward_layernorm)?,
                    post_feedforward_layernorm: opt(&l.post_feedforward_layernorm)?,
                    self_attn,
                    mlp,
                    kind: l.kind,
                })
            })
            .collect::<qlora_runtime::Result<Vec<_>>>()?;
        Ok(CausalLm {
            config: self.config.clone(),
            embed_tokens: frozen(&self.embed_tokens)?,
            layers: Rc::new(layers),
            norm: frozen(&self.norm)?,
            lm_head: opt(&self.lm_head)?,
            gradient_checkpointing: self.gradient_checkpointing,
            keep_layers: self.keep_layers,
            offload_layers: self.offload_layers,
            park_layers: self.park_layers,
            mlp_chunk_tokens: self.mlp_chunk_tokens,
            sharded: self.sharded.clone(),
        })
    }

    /// Where the decoder computes (its final norm's device; the embedding table may be kept on the host).
    pub fn compute_device(&self) -> Device {
        self.norm.value().device()
    }

    /// Keeps the embedding table in host memory, rows gathered there and uploaded per batch: the table's device
    /// memory (a vocabulary × hidden matrix, 1 GB for Llama-3-8B in bf16) for one upload of the batch's rows. Only
    /// for a frozen table that the head does not reuse (an untied or separate lm_head); an error otherwise.
    pub fn keep_embeddings_on_host(&mut self) -> Result<()> {
        let table = &self.embed_tokens;
        if table.is_trainable() || self.lm_head.is_none() {
            return Err(Error::Runtime(qlora_runtime::Error::invalid(
                "embeddings on the host",
                "the embedding table is trained or tied to the head, which reads it on the device",
            )));
        }
        if table.value().device() != Device::Cpu {
            self.embed_tokens = Param::frozen(table.name(), table.value().to_device(Device::Cpu)?);
        }
        Ok(())
    }

    /// Decoder layer `index` with every base weight whole: the layer itself, or for a sharded model a copy gathered
    /// from the ranks (a collective: every rank asks for the same layers in the same order).
    pub fn gathered_layer(&self, index: usize) -> qlora_runtime::Result<DecoderLayer> {
        let layer = LayerRef::of(&self.layers, index, self.sharded.as_deref(), None)?;
        Ok(DecoderLayer::clone(&layer))
    }

    /// Every projection, layer by layer in [`PROJECTIONS`](crate::config::PROJECTIONS) order.
    pub fn projections_mut(&mut self) -> Result<Vec<&mut Projection>> {
        let layers = Rc::get_mut(&mut self.layers).ok_or_else(|| {
            Error::Runtime(qlora_runtime::Error::invalid("model", "layers are shared by a forward still in flight"))
        })?;
        Ok(layers.iter_mut().flat_map(DecoderLayer::projections_mut).collect())
    }

    /// Every projection, layer by layer in [`PROJECTIONS`](crate::config::PROJECTIONS) order.
    pub fn projections(&self) -> Vec<&Projection> {
        self.layers.iter().flat_map(DecoderLayer::projections).collect()
    }

    /// Trainable parameters (the adapters').
    pub fn trainable_params(&self) -> Vec<Param> {
        self.projections().into_iter().filter_map(|p| p.adapter.as_ref()).flat_map(|a| a.params()).cloned().collect()
    }

    /// (cos, sin) for host `positions` on `device`: the tables are small, so they are built on the host and
    /// uploaded once per batch when the model runs on a GPU.
    fn rope(
        &self,
        positions: &Tensor,
        rope: &crate::config::Rope,
        device: Device,
    ) -> qlora_runtime::Result<(Tensor, Tensor)> {
        let f = inv_freq(rope, self.config.head_dim);
        let n = f.len();
        let (cos, sin) = rope_tables(positions, &Tensor::from_vec(f, &[n])?)?;
        Ok((cos.to_device(device)?, sin.to_device(device)?))
    }

    /// logits: [tokens, vocab] for a packed batch. `dropout_seed` makes adapter dropout reproducible.
    pub fn logits(&self, t: &Tape, batch: &Batch, dropout_seed: u64) -> qlora_runtime::Result<Var> {
        let x =
            self.forward_hidden(t, self.batch_ids(batch), &batch.positions, &batch.cu_seqlens, None, dropout_seed)?;
        self.head(t, &x)
    }

    /// `batch`'s ids where this model's embedding table looks them up (on the host for a table kept there).
    pub fn batch_ids<'a>(&self, batch: &'a Batch) -> &'a Tensor {
        batch.ids_on(self.embed_tokens.value().device())
    }

    /// Final-normed hidden states [tokens, hidden] of packed `ids` (sequences split by `cu_seqlens`, on the ids'
    /// device; `positions` on the host).
    /// With a `cache` (inference only, under `no_grad`), every layer appends the new keys and values to it and
    /// attends over everything cached for the sequence, the new tokens last (bottom-right aligned); `positions`
    /// must then continue from the cached lengths, and adapters run in peft's eval mode (no dropout, whatever their
    /// config and `dropout_seed`). See [`KvCache`].
    pub fn forward_hidden(
        &self,
        t: &Tape,
        ids: &Tensor,
        positions: &Tensor,
        cu_seqlens: &SeqLens,
        mut cache: Option<&mut KvCache>,
        dropout_seed: u64,
    ) -> qlora_runtime::Result<Var> {
        if cache.is_some() && t.is_recording() {
            // Cached keys re-enter as constants: gradients through them would be silently lost.
            return Err(qlora_runtime::Error::invalid("forward", "a KV cache is for inference: run under no_grad"));
        }
        let c = &self.config;
        let device = self.compute_device();
        let inputs = Rc::new(LayerInputs {
            cu_seqlens: cu_seqlens.clone(),
            rope_full: self.rope(positions, &c.rope, device)?,
            rope_local: self.rope(positions, &c.rope_local, device)?,
            dropout_seed: if cache.is_some() { None } else { Some(dropout_seed) },
            mlp_chunk: self.mlp_chunk_tokens,
            sharded: self.sharded.clone(),
        });
        let mut x = t.embedding(&t.param(&self.embed_tokens), ids)?;
        if x.value().device() != device {
            // A frozen table kept on the host: its rows for this batch cross once, in the compute dtype.
            x = Var::constant(x.value().to_device(device)?);
        }
        if c.family != Family::Llama {
            // transformers rounds √hidden to the activation dtype first (f32 here).
            x = t.scale(&x, (c.hidden_size as f64).sqrt() as f32 as f64)?;
        }
        let recomputed =
            if self.gradient_checkpointing { self.layers.len().saturating_sub(self.keep_layers) } else { 0 };
        let parked_count = self.park_layers.min(recomputed);
        let offloaded = self.offload_layers.min(recomputed - parked_count);
        // The previous offloaded layer's input handles, and the previous parked layer's activations: each layer's
        // backward brings its predecessor's back ahead of use.
        let (mut handles, mut parked) = (Vec::new(), None);
        let mut checkpointed = 0;
        // Without a tape (generation, evaluation) each layer leaves its MLP output for the next norm to add.
        let mut pending = None;
        for i in 0..self.layers.len() {
            x = if !t.is_recording() {
                let kv = cache.as_deref_mut().map(|cache| cache.layer_mut(i));
                let (x, m) = layer_unsummed(t, c, &self.layers, i, &inputs, (&x, pending.as_ref()), kv)?;
                pending = Some(m);
                x
            } else if i < recomputed && is_parked(i, recomputed, parked_count) {
                let layer = |t: &Tape, x: &Var| layer_forward(t, c, &self.layers, i, &inputs, x, None);
                let (out, set) = t.parked(&x, parked.take(), layer)?;
                parked = set;
                out
            } else if i < recomputed {
                let (layers, inputs, cfg) = (self.layers.clone(), inputs.clone(), c.clone());
                let layer =
                    move |t: &Tape, ins: &[Var]| Ok(vec![layer_forward(t, &cfg, &layers, i, &inputs, &ins[0], None)?]);
                checkpointed += 1;
                let mut outs = if checkpointed <= offloaded {
                    let (outs, next) = t.checkpoint_offloaded(&[&x], std::mem::take(&mut handles), layer)?;
                    handles = next;
                    outs
                } else {
                    t.checkpoint(&[&x], layer)?
                };
                outs.remove(0)
            } else {
                layer_forward(t, c, &self.layers, i, &inputs, &x, None)?
            };
        }
        let (norm, eps, offset) = (t.param(&self.norm), c.rms_norm_eps, norm_offset(c.family));
        match pending {
            Some(m) => Ok(t.add_rms_norm(&x, &m, &norm, eps, offset)?.1),
            None => t.rms_norm(&x, &norm, eps, offset),
        }
    }

    /// Logits [rows, vocab] of final hidden states [rows, hidden]: lm_head (or the tied embeddings), then the
    /// final softcap where the model has one. Callers may pass a subset of rows (the last token when decoding,
    /// chunks when evaluating) so that [tokens, vocab] never exists whole.
    pub fn head(&self, t: &Tape, x: &Var) -> qlora_runtime::Result<Var> {
        let _profile = profile::scope(Pass::Forward, "lm head");
        let head = t.param(self.lm_head.as_ref().unwrap_or(&self.embed_tokens));
        let logits = t.linear(x, &head, None)?;
        match self.config.final_logit_softcapping {
            Some(cap) => t.softcap(&logits, cap),
            None => Ok(logits),
        }
    }

    /// Σ token losses ÷ `normalizer` (pass the trained-token count of the whole accumulated batch). A frozen head
    /// (QLoRA's) runs fused with the loss, chunk by chunk, so the [tokens, vocab] logits never exist
    /// (`qlora_runtime::ops::linear_cross_entropy`); a trainable one takes the plain head and loss.
    pub fn loss(&self, t: &Tape, batch: &Batch, normalizer: f64, dropout_seed: u64) -> qlora_runtime::Result<Var> {
        let x =
            self.forward_hidden(t, self.batch_ids(batch), &batch.positions, &batch.cu_seqlens, None, dropout_seed)?;
        let head = t.param(self.lm_head.as_ref().unwrap_or(&self.embed_tokens));
        if head.requires_grad() {
            let logits = self.head(t, &x)?;
            let _profile = profile::scope(Pass::Forward, "cross entropy");
            return t.cross_entropy(&logits, &batch.targets, normalizer);
        }
        let _profile = profile::scope(Pass::Forward, "lm head + cross entropy");
        let cap = self.config.final_logit_softcapping;
        t.apply([&x], |[x], [needs_dx]| {
            linear_cross_entropy_op(x, head.value(), &batch.targets, cap, normalizer, needs_dx)
        })
    }
}

/// Whether recomputed-by-default layer `i` (of `recomputed`) is one of the `parked` spread evenly over them: the layers
/// where ⌊(i + 1)·parked / recomputed⌋ steps up, which include the last one and leave ⌊recomputed / parked⌋ or one more
/// layers between two parked ones.
fn is_parked(i: usize, recomputed: usize, parked: usize) -> bool {
    (i + 1) * parked / recomputed != i * parked / recomputed
}

#[cfg(test)]
mod tests {
    use super::is_parked;

    /// `parked` layers of `recomputed`, the last among them, never two adjacent while fewer than half are parked, and
    /// the gaps between them differing by one at most.
    #[test]
    fn parked_layers_are_spread_evenly_and_include_the_last() {
        for recomputed in 1..=40 {
            for parked in 0..=recomputed {
                let at: Vec<usize> = (0..recomputed).filter(|&i| is_parked(i, recomputed, parked)).collect();
                assert_eq!(at.len(), parked, "{parked} of {recomputed}");
                if parked == 0 {
                    continue;
                }
                assert_eq!(at.last(), Some(&(recomputed - 1)), "{parked} of {recomputed}: the last one");
                let gaps: Vec<usize> = at.windows(2).map(|w| w[1] - w[0]).collect();
                let (lo, hi) = (gaps.iter().min().copied(), gaps.iter().max().copied());
                assert!(hi.zip(lo).is_none_or(|(hi, lo)| hi - lo <= 1), "{parked} of {recomputed}: gaps {gaps:?}");
                assert!(2 * parked > recomputed || lo.is_none_or(|lo| lo >= 2), "{parked} of {recomputed}: {at:?}");
            }
        }
    }
}
