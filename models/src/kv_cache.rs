//! The KV cache: every layer's keys and values of each sequence from position 0. New tokens attend to them through
//! the ordinary attention op with cu_seqlens_q ≠ cu_seqlens_k (queries aligned to the end of the keys), so decoding
//! runs the same layer code as training. Sliding-window layers keep the full history too and let the op's window
//! mask it (simpler than a ring buffer; memory is what full-attention layers need anyway). The cache lives where the
//! model runs: host vectors on the CPU, device tensors on a GPU.
//!
//! Sized from the [`ModelConfig`] alone, so that the decoder (`transformer`) can fill it without this file knowing
//! the decoder.

use crate::config::ModelConfig;
use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::ops::concat::cat_rows;
use qlora_runtime::{Device, Tensor};

/// One layer's cached keys and values, per sequence, oldest first: rows of kv_heads·head_dim values.
pub(crate) struct LayerKv {
    /// Set by the first tokens, from where their keys live.
    store: Option<Store>,
    lens: Vec<usize>,
    row: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Where a layer's cache lives: f32 vectors on the host (the CPU's compute precision), or per-sequence tensors on the
/// model's GPU in the activations' dtype (grown by a device copy per step; nothing crosses the bus).
enum Store {
    Host { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    Device { k: Vec<Option<Tensor>>, v: Vec<Option<Tensor>> },
}

impl LayerKv {
    /// Appends new k, v: [tokens, kv_heads, head_dim] (sequences split by cu_seqlens_q) and returns everything
    /// cached, packed the same way: (k, v: [cached, kv_heads, head_dim], cu_seqlens_k, on k's device). The cache is
    /// copied into the packed tensors on every call: O(cached) per step, the same order as attention's own reads
    /// (one sequence on a GPU is its stored tensors, no copy).
    pub(crate) fn extend(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens_q: &SeqLens,
    ) -> qlora_runtime::Result<(Tensor, Tensor, SeqLens)> {
        let cu = cu_seqlens_q.host();
        let tokens = k.shape().first().copied().unwrap_or(0);
        let expected = [tokens, self.kv_heads, self.head_dim];
        if k.shape() != expected || v.shape() != expected || cu.len() != self.lens.len() + 1 {
            return Err(qlora_runtime::Error::shape(
                "kv cache",
                format!(
                    "k {:?}, v {:?} with {} sequence boundaries for a cache of {} sequences, {} KV heads of {}",
                    k.shape(),
                    v.shape(),
                    cu.len(),
                    self.lens.len(),
                    self.kv_heads,
                    self.head_dim
                ),
            ));
        }
        let device = k.device();
        let sequences = self.lens.len();
        let store = self.store.get_or_insert_with(|| match device {
            Device::Cpu => Store::Host { k: vec![Vec::new(); sequences], v: vec![Vec::new(); sequences] },
            Device::Cuda(_) => Store::Device { k: vec![None; sequences], v: vec![None; sequences] },
        });
        let new_lens: Vec<usize> = (0..sequences).map(|s| self.lens[s] + (cu[s + 1] - cu[s]) as usize).collect();
        let mut cu_k = vec![0i32];
        for &n in &new_lens {
            cu_k.push(cu_k.last().expect("starts with 0") + n as i32);
        }
        let total = *cu_k.last().expect("starts with 0") as usize;
        let shape = [total, self.kv_heads, self.head_dim];
        let (k, v) = match store {
            Store::Host { k: hk, v: hv } => {
                let (kn, vn) = (k.values::<f32>(), v.values::<f32>());
                for s in 0..sequences {
                    let (a, b) = (cu[s] as usize * self.row, cu[s + 1] as usize * self.row);
                    hk[s].extend_from_slice(&kn[a..b]);
                    hv[s].extend_from_slice(&vn[a..b]);
                }
                (Tensor::from_vec(hk.concat(), &shape)?, Tensor::from_vec(hv.concat(), &shape)?)
            }
            Store::Device { k: dk, v: dv } => {
                let (k2, v2) = (k.reshape(&[tokens, self.row])?, v.reshape(&[tokens, self.row])?);
                for s in 0..sequences {
                    // Rows past a truncation are views away.
                    for t in [&mut dk[s], &mut dv[s]] {
                        if t.as_ref().is_some_and(|t| t.shape()[0] > self.lens[s]) {
                            *t = t
                                .as_ref()
                                .map(|t| t.narrow(0, 0, self.lens[s]))
                                .transpose()?
                                .filter(|_| self.lens[s] > 0);
                        }
                    }
                    let (at, n) = (cu[s] as usize, (cu[s + 1] - cu[s]) as usize);
                    if n > 0 {
                        dk[s] = Some(grow(dk[s].as_ref(), &k2.narrow(0, at, n)?, new_lens[s], self.row)?);
                        dv[s] = Some(grow(dv[s].as_ref(), &v2.narrow(0, at, n)?, new_lens[s], self.row)?);
                    }
                }
                (pack(dk, &shape, k)?, pack(dv, &shape, v)?)
            }
        };
        self.lens = new_lens;
        Ok((k, v, SeqLens::new(&cu_k, device)?))
    }

    /// Forgets what was appended after each sequence's `lens[s]` tokens (a device store drops the rows at its next
    /// extend).
    fn truncate(&mut self, lens: &[usize]) {
        for (s, &n) in lens.iter().enumerate() {
            if let Some(Store::Host { k, v }) = &mut self.store {
                k[s].truncate(n * self.row);
                v[s].truncate(n * self.row);
            }
            self.lens[s] = self.lens[s].min(n);
        }
    }
}

/// A sequence's cached rows with `new` ([n, row]) after them: `len` rows on the device.
fn grow(old: Option<&Tensor>, new: &Tensor, len: usize, row: usize) -> qlora_runtime::Result<Tensor> {
    let parts: Vec<Tensor> = old.into_iter().cloned().chain([new.clone()]).collect();
    cat_rows(&parts, &[len, row], new.dtype(), new.device())
}

/// Every sequence's rows packed into `shape` (like `like`'s dtype and device); one sequence is its own tensor.
fn pack(per_seq: &[Option<Tensor>], shape: &[usize], like: &Tensor) -> qlora_runtime::Result<Tensor> {
    let parts: Vec<Tensor> = per_seq.iter().flatten().cloned().collect();
    match parts.as_slice() {
        [one] => one.reshape(shape),
        _ => cat_rows(&parts, shape, like.dtype(), like.device()),
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
            store: None,
            lens: vec![0; sequences],
            row: c.num_key_value_heads * c.head_dim,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        KvCache { layers: (0..c.num_hidden_layers).map(|_| layer()).collect() }
    }

    pub fn sequences(&self) -> usize {
        self.layers.first().map_or(0, |l| l.lens.len())
    }

    /// Tokens cached for sequence `seq` (the position the next token takes).
    pub fn seq_len(&self, seq: usize) -> usize {
        self.layers.first().map_or(0, |l| l.lens[seq])
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut LayerKv {
        &mut self.layers[i]
    }

    /// Drops what was appended after each sequence's `lens[s]` tokens.
    pub(crate) fn truncate(&mut self, lens: &[usize]) {
        self.layers.iter_mut().for_each(|l| l.truncate(lens));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_runtime::{DType, Rng};

    fn layer(store: Option<Store>, sequences: usize) -> LayerKv {
        LayerKv { store, lens: vec![0; sequences], row: 6, kv_heads: 2, head_dim: 3 }
    }

    /// The device store's logic (per-sequence tensors grown by row copies, packed, cut back after a truncation) run
    /// on CPU tensors: every step returns exactly what the host store returns.
    #[test]
    fn the_tensor_store_packs_what_the_host_store_packs() {
        let mut rng = Rng::new(3);
        let tensors = Store::Device { k: vec![None, None], v: vec![None, None] };
        let (mut host, mut dev) = (layer(None, 2), layer(Some(tensors), 2));
        // Steps of (tokens of sequence 0, of sequence 1); a truncation back to (3, 2) after the third.
        for (step, [a, b]) in [[3usize, 2], [1, 0], [2, 2], [0, 1], [1, 1]].into_iter().enumerate() {
            let n = a + b;
            let k = Tensor::randn(&[n, 2, 3], 1.0, DType::F32, &mut rng);
            let v = Tensor::randn(&[n, 2, 3], 1.0, DType::F32, &mut rng);
            let cu = SeqLens::new(&[0, a as i32, n as i32], Device::Cpu).unwrap();
            let (hk, hv, hcu) = host.extend(&k, &v, &cu).unwrap();
            let (dk, dv, dcu) = dev.extend(&k, &v, &cu).unwrap();
            assert_eq!(hcu.host(), dcu.host(), "step {step}");
            assert_eq!((hk.shape(), hv.shape()), (dk.shape(), dv.shape()), "step {step}");
            assert_eq!(
                (hk.to_vec::<f32>(), hv.to_vec::<f32>()),
                (dk.to_vec::<f32>(), dv.to_vec::<f32>()),
                "step {step}"
            );
            if step == 2 {
                host.truncate(&[3, 2]);
                dev.truncate(&[3, 2]);
                assert_eq!(dev.lens, [3, 2]);
            }
        }
    }
}
