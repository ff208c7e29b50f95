//! The KV cache: every layer's keys and values of each sequence from position 0. New tokens attend to them through
//! the ordinary attention op with cu_seqlens_q ≠ cu_seqlens_k (queries aligned to the end of the keys), so decoding
//! runs the same layer code as training. Sliding-window layers keep the full history too and let the op's window
//! mask it (simpler than a ring buffer; memory is what full-attention layers need anyway). The cache lives where the
//! model runs: host vectors on the CPU, device tensors on a GPU.
//!
//! On a GPU each sequence's keys (and values) live in a buffer with spare rows: new rows are written in place after
//! the cached ones, and a full buffer moves to one of twice the rows (at first, the power of two above the prompt),
//! so a token costs O(1) copies, not O(cached). Attention is handed a view of the filled rows: for one sequence no
//! copy at all. Several sequences are still packed into one tensor by a copy per step, because the attention
//! kernels read them contiguous (O(cached) per step, the same order as attention's own reads). Keys may enter
//! rotated by the layer's rope (`LayerKv::extend_rotated`): one sequence's are then rotated straight into its spare
//! rows, with its values, in one launch.
//!
//! Sized from the [`ModelConfig`] alone, so that the decoder (`transformer`) can fill it without this file knowing
//! the decoder.

use crate::config::ModelConfig;
use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::ops::concat::{cat_rows, write_rows};
use qlora_runtime::ops::rope::{rope_qk, rope_qkv_into};
use qlora_runtime::{DType, Device, Tensor};

/// One layer's cached keys and values, per sequence, oldest first: rows of kv_heads·head_dim values.
pub(crate) struct LayerKv {
    /// Set by the first tokens, from where their keys live.
    store: Option<Store>,
    lens: Vec<usize>,
    row: usize,
    kv_heads: usize,
    head_dim: usize,
    /// The model's context: a buffer does not grow past it for a sequence that fits in it.
    max_rows: usize,
}

/// Where a layer's cache lives: f32 vectors on the host (the CPU's compute precision), or per-sequence [capacity, row]
/// tensors on the model's GPU in the activations' dtype, filled up to the sequence's length (nothing crosses the
/// bus).
enum Store {
    Host { k: Vec<Vec<f32>>, v: Vec<Vec<f32>> },
    Device { k: Vec<Option<Tensor>>, v: Vec<Option<Tensor>> },
}

impl LayerKv {
    /// Appends new k, v: [tokens, kv_heads, head_dim] (sequences split by cu_seqlens_q) and returns everything
    /// cached, packed the same way: (k, v: [cached, kv_heads, head_dim], cu_seqlens_k, on k's device). Several
    /// sequences, or any on the host, are copied into the packed tensors; one sequence on a GPU is a view of its
    /// buffer (see the module docs).
    pub(crate) fn extend(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens_q: &SeqLens,
    ) -> qlora_runtime::Result<(Tensor, Tensor, SeqLens)> {
        let (new_lens, cu_k, shape) = self.grown_by(k, v, cu_seqlens_q)?;
        let cu = cu_seqlens_q.host();
        let (device, sequences, row, tokens) = (k.device(), self.lens.len(), self.row, k.shape()[0]);
        let (lens, limit) = (&self.lens, self.max_rows);
        let (k, v) = match store_on(&mut self.store, sequences, device) {
            Store::Host { k: hk, v: hv } => {
                let (kn, vn) = (k.values::<f32>(), v.values::<f32>());
                for s in 0..sequences {
                    let (a, b) = (cu[s] as usize * row, cu[s + 1] as usize * row);
                    hk[s].extend_from_slice(&kn[a..b]);
                    hv[s].extend_from_slice(&vn[a..b]);
                }
                (Tensor::from_vec(hk.concat(), &shape)?, Tensor::from_vec(hv.concat(), &shape)?)
            }
            Store::Device { k: dk, v: dv } => {
                let (k2, v2) = (k.reshape(&[tokens, row])?, v.reshape(&[tokens, row])?);
                for s in 0..sequences {
                    let (at, n) = (cu[s] as usize, (cu[s + 1] - cu[s]) as usize);
                    if n > 0 {
                        append(&mut dk[s], lens[s], &k2.narrow(0, at, n)?, limit)?;
                        append(&mut dv[s], lens[s], &v2.narrow(0, at, n)?, limit)?;
                    }
                }
                (pack(dk, &new_lens, &shape, k)?, pack(dv, &new_lens, &shape, v)?)
            }
        };
        self.lens = new_lens;
        Ok((k, v, SeqLens::new(&cu_k, device)?))
    }

    /// [`LayerKv::extend`] with the keys rotated by (cos, sin) on their way in, as a layer rotates q and k
    /// ([`rope_qk`]): returns q rotated too, then what `extend` returns. One sequence in a tensor store is rotated
    /// straight into its buffer's spare rows, v copied beside it, in one launch on a GPU (instead of a rotation and
    /// two copies per layer and token).
    pub(crate) fn extend_rotated(
        &mut self,
        [q, k, v]: [&Tensor; 3],
        (cos, sin): (&Tensor, &Tensor),
        cu_seqlens_q: &SeqLens,
    ) -> qlora_runtime::Result<(Tensor, Tensor, Tensor, SeqLens)> {
        let tokens = k.shape().first().copied().unwrap_or(0);
        let store = store_on(&mut self.store, self.lens.len(), k.device());
        let one_in_tensors = self.lens.len() == 1 && matches!(store, Store::Device { .. });
        if !one_in_tensors || tokens == 0 {
            let [q, k] = rope_qk(q, k, cos, sin)?;
            let (k, v, cu) = self.extend(&k, v, cu_seqlens_q)?;
            return Ok((q, k, v, cu));
        }
        let (new_lens, cu_k, shape) = self.grown_by(k, v, cu_seqlens_q)?;
        let (len, limit, row) = (self.lens[0], self.max_rows, self.row);
        let Some(Store::Device { k: dk, v: dv }) = &mut self.store else { unreachable!("checked above") };
        let like = (k.dtype(), k.device());
        let q = rope_qkv_into(
            [q, k, v],
            cos,
            sin,
            [reserve(&mut dk[0], len, tokens, row, like, limit)?, reserve(&mut dv[0], len, tokens, row, like, limit)?],
            len,
        )?;
        let (k, v, device) = (pack(dk, &new_lens, &shape, k)?, pack(dv, &new_lens, &shape, v)?, k.device());
        self.lens = new_lens;
        Ok((q, k, v, SeqLens::new(&cu_k, device)?))
    }

    /// Checks new k, v against the cache and returns each sequence's length after them, the keys' boundaries and the
    /// packed shape of everything cached.
    fn grown_by(
        &self,
        k: &Tensor,
        v: &Tensor,
        cu_seqlens_q: &SeqLens,
    ) -> qlora_runtime::Result<(Vec<usize>, Vec<i32>, [usize; 3])> {
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
        let new_lens: Vec<usize> = (0..self.lens.len()).map(|s| self.lens[s] + (cu[s + 1] - cu[s]) as usize).collect();
        let mut cu_k = vec![0i32];
        for &n in &new_lens {
            cu_k.push(cu_k.last().expect("starts with 0") + n as i32);
        }
        let total = *cu_k.last().expect("starts with 0") as usize;
        Ok((new_lens, cu_k, [total, self.kv_heads, self.head_dim]))
    }

    /// Forgets what was appended after each sequence's `lens[s]` tokens (a device store's rows past them are spare,
    /// overwritten by the next tokens).
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

/// A layer's store, made for `device` by its first tokens.
fn store_on(store: &mut Option<Store>, sequences: usize, device: Device) -> &mut Store {
    store.get_or_insert_with(|| match device {
        Device::Cpu => Store::Host { k: vec![Vec::new(); sequences], v: vec![Vec::new(); sequences] },
        Device::Cuda(_) => Store::Device { k: vec![None; sequences], v: vec![None; sequences] },
    })
}

/// Writes `new` ([n, row]) after the first `len` rows of a sequence's buffer ([`reserve`]).
fn append(store: &mut Option<Tensor>, len: usize, new: &Tensor, limit: usize) -> qlora_runtime::Result<()> {
    let [n, row] = *new.shape() else { unreachable!("rows of the cache's width") };
    write_rows(reserve(store, len, n, row, (new.dtype(), new.device()), limit)?, len, new)
}

/// A sequence's buffer with room for `n` rows after its first `len`: itself, or a buffer of [`capacity`] rows (of
/// `row` values, in `like`'s dtype on its device) that those rows move to when they would not fit (spare rows zero, so
/// nothing uninitialised is ever on the device).
fn reserve(
    store: &mut Option<Tensor>,
    len: usize,
    n: usize,
    row: usize,
    (dtype, device): (DType, Device),
    limit: usize,
) -> qlora_runtime::Result<&mut Tensor> {
    let needed = len + n;
    if store.as_ref().is_none_or(|buffer| buffer.shape()[0] < needed) {
        let old = store.as_ref().map_or(0, |t| t.shape()[0]);
        let mut grown = Tensor::zeros_on(&[capacity(needed, old, limit), row], dtype, device)?;
        if let Some(filled) = store.as_ref().filter(|_| len > 0) {
            write_rows(&mut grown, 0, &filled.narrow(0, 0, len)?)?;
        }
        *store = Some(grown);
    }
    Ok(store.as_mut().expect("a buffer of at least `needed` rows, set above"))
}

/// Rows of a sequence's buffer when `needed` no longer fit in `old`: the power of two above `needed` (so that the next
/// token fits too), at least twice `old` (geometric growth: O(1) copied rows per token), but not past `limit` (the
/// model's context) for a sequence that fits in it.
fn capacity(needed: usize, old: usize, limit: usize) -> usize {
    let grown = (needed + 1).next_power_of_two().max(2 * old);
    if needed <= limit {
        grown.min(limit)
    } else {
        grown
    }
}

/// Every sequence's first `lens[s]` rows packed into `shape` (like `like`'s dtype and device); one sequence is a view
/// of its buffer.
fn pack(per_seq: &[Option<Tensor>], lens: &[usize], shape: &[usize], like: &Tensor) -> qlora_runtime::Result<Tensor> {
    let filled = per_seq.iter().zip(lens).filter_map(|(t, &n)| t.as_ref().filter(|_| n > 0).map(|t| t.narrow(0, 0, n)));
    let parts = filled.collect::<qlora_runtime::Result<Vec<Tensor>>>()?;
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
            max_rows: c.max_position_embeddings,
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
    use qlora_runtime::ops::rope::rope_tables;
    use qlora_runtime::Rng;

    fn layer(store: Option<Store>, sequences: usize, max_rows: usize) -> LayerKv {
        LayerKv { store, lens: vec![0; sequences], row: 6, kv_heads: 2, head_dim: 3, max_rows }
    }

    /// A host layer and a tensor layer (the device store's logic run on CPU tensors) over the same tokens.
    struct Twins {
        host: LayerKv,
        dev: LayerKv,
        rng: Rng,
    }

    impl Twins {
        fn new(sequences: usize, max_rows: usize) -> Self {
            let tensors = Store::Device { k: vec![None; sequences], v: vec![None; sequences] };
            let (host, dev) = (layer(None, sequences, max_rows), layer(Some(tensors), sequences, max_rows));
            Twins { host, dev, rng: Rng::new(3) }
        }

        /// Appends `tokens[s]` new tokens to sequence s in both; every step returns exactly what the host returns.
        fn step(&mut self, tokens: &[usize]) {
            let n: usize = tokens.iter().sum();
            let k = Tensor::randn(&[n, 2, 3], 1.0, DType::F32, &mut self.rng);
            let v = Tensor::randn(&[n, 2, 3], 1.0, DType::F32, &mut self.rng);
            let mut cu = vec![0i32];
            tokens.iter().for_each(|&t| cu.push(cu.last().unwrap() + t as i32));
            let cu = SeqLens::new(&cu, Device::Cpu).unwrap();
            let (hk, hv, hcu) = self.host.extend(&k, &v, &cu).unwrap();
            let (dk, dv, dcu) = self.dev.extend(&k, &v, &cu).unwrap();
            assert_eq!(hcu.host(), dcu.host(), "{tokens:?}");
            assert_eq!((hk.shape(), hv.shape()), (dk.shape(), dv.shape()), "{tokens:?}");
            let values = |a: &Tensor, b: &Tensor| (a.to_vec::<f32>(), b.to_vec::<f32>());
            assert_eq!(values(&hk, &hv), values(&dk, &dv), "{tokens:?}");
        }

        fn truncate(&mut self, lens: &[usize]) {
            self.host.truncate(lens);
            self.dev.truncate(lens);
            assert_eq!(self.dev.lens, lens);
        }

        /// Rows of each sequence's key and value buffers (0: none yet).
        fn capacities(&self) -> Vec<(usize, usize)> {
            let Some(Store::Device { k, v }) = &self.dev.store else { panic!("a tensor store") };
            let rows = |t: &Option<Tensor>| t.as_ref().map_or(0, |t| t.shape()[0]);
            k.iter().zip(v).map(|(k, v)| (rows(k), rows(v))).collect()
        }
    }

    /// Keys rotated on their way in: one sequence in a tensor store (written by `rope_qkv_into`, the GPU's one
    /// launch, here its CPU twin) and any in the host store (`rope_qk`, then `extend`) return the same q, k and v,
    /// across a buffer's growth; the keys are rotated, the values not.
    #[test]
    fn keys_rotated_on_the_way_in_are_the_same_in_both_stores() {
        let tensors = Store::Device { k: vec![None], v: vec![None] };
        let kv = |store| LayerKv { store, lens: vec![0], row: 8, kv_heads: 2, head_dim: 4, max_rows: 64 };
        let (mut host, mut dev) = (kv(None), kv(Some(tensors)));
        let mut rng = Rng::new(5);
        let mut at = 0;
        for n in [3usize, 1, 1, 2] {
            let positions = Tensor::from_vec((at..at + n).map(|p| p as i32).collect(), &[n]).unwrap();
            let (cos, sin) = rope_tables(&positions, &Tensor::from_vec(vec![1.0f32, 0.01], &[2]).unwrap()).unwrap();
            let q = Tensor::randn(&[n, 4, 4], 1.0, DType::F32, &mut rng);
            let k = Tensor::randn(&[n, 2, 4], 1.0, DType::F32, &mut rng);
            let v = Tensor::randn(&[n, 2, 4], 1.0, DType::F32, &mut rng);
            let cu = SeqLens::new(&[0, n as i32], Device::Cpu).unwrap();
            let got = |layer: &mut LayerKv| {
                let (q, k, v, cu) = layer.extend_rotated([&q, &k, &v], (&cos, &sin), &cu).unwrap();
                (q.to_vec::<f32>(), k.to_vec::<f32>(), v.to_vec::<f32>(), cu.host().to_vec())
            };
            let (want, tensor_store) = (got(&mut host), got(&mut dev));
            assert_eq!(want, tensor_store, "after {at} tokens, {n} more");
            let [rq, rk] = rope_qk(&q, &k, &cos, &sin).unwrap();
            assert_eq!(want.0, rq.to_vec::<f32>());
            assert_eq!(want.1[at * 8..], rk.to_vec::<f32>()[..], "the new keys, rotated");
            assert_eq!(want.2[at * 8..], v.to_vec::<f32>()[..], "the new values, as they came");
            at += n;
        }
        let Some(Store::Device { k, .. }) = &dev.store else { panic!("a tensor store") };
        assert_eq!(k[0].as_ref().map(|t| t.shape()[0]), Some(8), "grown from 4 rows to 8");
    }

    /// Per-sequence buffers written in place, packed, cut back by a truncation: what the host store returns.
    #[test]
    fn the_tensor_store_packs_what_the_host_store_packs() {
        let mut t = Twins::new(2, 1 << 20);
        // Steps of (tokens of sequence 0, of sequence 1); a truncation back to (3, 2) after the third.
        for (step, tokens) in [[3usize, 2], [1, 0], [2, 2], [0, 1], [1, 1]].into_iter().enumerate() {
            t.step(&tokens);
            if step == 2 {
                t.truncate(&[3, 2]);
            }
        }
    }

    /// A buffer starts at the power of two above the prompt, doubles when a token no longer fits (keeping its rows),
    /// stops at the model's context, and after a truncation the next tokens overwrite the forgotten rows.
    #[test]
    fn buffers_double_past_capacity_and_truncated_rows_are_overwritten() {
        let mut t = Twins::new(1, 12);
        t.step(&[3]);
        assert_eq!(t.capacities(), [(4, 4)], "the power of two above a prompt of 3");
        t.step(&[1]);
        assert_eq!(t.capacities(), [(4, 4)], "4 rows fit in 4");
        t.step(&[1]);
        assert_eq!(t.capacities(), [(8, 8)], "the fifth did not");
        t.step(&[2]);
        t.step(&[1]);
        assert_eq!(t.capacities(), [(8, 8)], "8 rows fit in 8");
        t.step(&[1]);
        assert_eq!(t.capacities(), [(12, 12)], "16 rows would pass the context of 12");
        t.truncate(&[2]);
        t.step(&[5]);
        t.step(&[1]);
        assert_eq!((t.capacities(), t.dev.lens.clone()), (vec![(12, 12)], vec![8]), "written over the forgotten rows");
        t.step(&[5]);
        assert_eq!(t.capacities(), [(24, 24)], "past the context: doubling goes on (generate stops before)");
    }
}
