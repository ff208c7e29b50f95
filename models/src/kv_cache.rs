//! The KV cache: every layer's keys and values of each sequence from position 0. New tokens attend to them through
//! the ordinary attention op with cu_seqlens_q ≠ cu_seqlens_k (queries aligned to the end of the keys), so decoding
//! runs the same layer code as training. Sliding-window layers keep the full history too and let the op's window
//! mask it (simpler than a ring buffer; memory is what full-attention layers need anyway).
//!
//! Sized from the [`ModelConfig`] alone, so that the decoder (`transformer`) can fill it without this file knowing
//! the decoder.

use crate::config::ModelConfig;
use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::{Device, Tensor};

/// One layer's cached keys and values, per sequence: rows of kv_heads·head_dim f32 values (the CPU compute
/// precision), oldest first.
pub(crate) struct LayerKv {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    row: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl LayerKv {
    fn len(&self, seq: usize) -> usize {
        self.k[seq].len() / self.row
    }

    /// Appends new k, v: [tokens, kv_heads, head_dim] (sequences split by cu_seqlens_q) and returns everything
    /// cached, packed the same way: (k, v: [cached, kv_heads, head_dim], cu_seqlens_k). The whole cache is copied
    /// into the packed tensors on every call: O(cached) per step, the same order as attention's own reads.
    pub(crate) fn extend(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens_q: &SeqLens,
    ) -> qlora_runtime::Result<(Tensor, Tensor, SeqLens)> {
        let cu = cu_seqlens_q.host();
        let tokens = k.shape().first().copied().unwrap_or(0);
        let expected = [tokens, self.kv_heads, self.head_dim];
        if k.shape() != expected || v.shape() != expected || cu.len() != self.k.len() + 1 {
            return Err(qlora_runtime::Error::shape(
                "kv cache",
                format!(
                    "k {:?}, v {:?} with {} sequence boundaries for a cache of {} sequences, {} KV heads of {}",
                    k.shape(),
                    v.shape(),
                    cu.len(),
                    self.k.len(),
                    self.kv_heads,
                    self.head_dim
                ),
            ));
        }
        let (kn, vn) = (k.values::<f32>(), v.values::<f32>());
        let mut cu_k = vec![0i32];
        for s in 0..self.k.len() {
            let (a, b) = (cu[s] as usize * self.row, cu[s + 1] as usize * self.row);
            self.k[s].extend_from_slice(&kn[a..b]);
            self.v[s].extend_from_slice(&vn[a..b]);
            cu_k.push(cu_k[s] + self.len(s) as i32);
        }
        let total = *cu_k.last().expect("starts with 0") as usize;
        let shape = [total, self.kv_heads, self.head_dim];
        let k = Tensor::from_vec(self.k.concat(), &shape)?;
        let v = Tensor::from_vec(self.v.concat(), &shape)?;
        Ok((k, v, SeqLens::new(&cu_k, Device::Cpu)?))
    }

    fn truncate(&mut self, lens: &[usize]) {
        for (s, &n) in lens.iter().enumerate() {
            self.k[s].truncate(n * self.row);
            self.v[s].truncate(n * self.row);
        }
    }
}

/// Keys and values of every layer for a fixed number of sequences, grown as tokens are run.
pub struct KvCache {
    layers: Vec<LayerKv>,
}

impl KvCache {
    /// An empty cache for `sequences` sequences of a model with this `config`.
    pub fn new(config: &ModelConfig, sequences: usize) -> Self {
        let c = config;
        let layer = || LayerKv {
            k: vec![Vec::new(); sequences],
            v: vec![Vec::new(); sequences],
            row: c.num_key_value_heads * c.head_dim,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        KvCache { layers: (0..c.num_hidden_layers).map(|_| layer()).collect() }
    }

    pub fn sequences(&self) -> usize {
        self.layers.first().map_or(0, |l| l.k.len())
    }

    /// Tokens cached for sequence `seq` (the position the next token takes).
    pub fn seq_len(&self, seq: usize) -> usize {
        self.layers.first().map_or(0, |l| l.len(seq))
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    /// Drops what was appended after each sequence's `lens[s]` tokens.
    pub(crate) fn truncate(&mut self, lens: &[usize]) {
        self.layers.iter_mut().for_each(|l| l.truncate(lens));
    }
}
