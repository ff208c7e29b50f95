//! FSDP-style sharding of a model's frozen NF4 base (the seeds' QLoRA + FSDP): each rank of a group holds 1/N of
//! every decoder layer's packed nibbles and scales, and a layer is gathered whole just before it runs: in forward,
//! and again when checkpointing recomputes it for backward, whose ops keep the gathered weights until that layer's
//! backward is done and then free them. Everything else (embeddings, norms, the head, biases, dense bases, the
//! adapters and their optimizer state) stays replicated, so training is the unsharded model's bit for bit.
//!
//! A layer's NF4 state is two streams: bytes (each weight's packed nibbles, then its nested absmax codes) and f32s
//! (each weight's absmax, or its nested second-level absmax), weights in projection order. Each stream is padded to
//! a multiple of N and rank r keeps its r-th piece. Gathering the layer is one all-gather per stream; each weight's
//! parts are then cut from the gathered streams, so the gathered weights are the loaded ones to the bit. Layers are
//! split one at a time as they load, so a rank's host never holds more than one whole layer beside its shards.
//!
//! Each gather starts the next one (the next layer in forward, the previous one in backward's recompute), which on
//! GPUs runs on the collectives' own stream under the current layer's compute; the gather after finds its layer on
//! the way. A prefetch nobody asks for (a forward cut short) is dropped: every rank makes the same choices, so the
//! ranks still issue the same collectives in the same order.
//!
//! Owns: the split, the gather, and the layout mapping streams to weights. Must not know about training.

use crate::decoder::DecoderLayer;
use qlora_runtime::dist::{Communicator, Pending};
use qlora_runtime::memory::{tagged, Category};
use qlora_runtime::quant::{Absmax, AbsmaxTensors, BaseWeight, Nf4Tensors, Nf4Weight};
use qlora_runtime::{DType, Device, Error, Result, Tensor};
use std::cell::{Cell, RefCell};
use std::ops::Range;
use std::sync::Arc;

/// The frozen NF4 weights of a model's decoder layers, this rank's share of them.
pub struct ShardedBase {
    group: Arc<dyn Communicator>,
    /// Where the shards live and the gathered layers are put together.
    device: Device,
    layers: Vec<LayerShard>,
    /// The layer whose gather the last one started.
    prefetched: RefCell<Option<Inbound>>,
    /// Gathers that found their layer on its way, and gathers started when asked for.
    counts: Cell<GatherCounts>,
}

/// How a sharded model's gathers went ([`ShardedBase::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GatherCounts {
    pub prefetched: usize,
    pub on_demand: usize,
}

/// A layer's two streams on their way.
struct Inbound {
    index: usize,
    bytes: Pending,
    floats: Pending,
}

/// One decoder layer's share: this rank's piece of each stream and where each weight sits in the whole streams.
#[derive(Clone)]
struct LayerShard {
    /// u8 \[⌈bytes / N⌉\].
    bytes: Tensor,
    /// f32 \[⌈floats / N⌉\].
    floats: Tensor,
    weights: Vec<Layout>,
}

/// Where one NF4 weight of a layer lies in the layer's streams, and what is needed to put it back together.
#[derive(Clone)]
struct Layout {
    /// The projection's index in the layer, in [`PROJECTIONS`](crate::config::PROJECTIONS) order.
    slot: usize,
    shape: [usize; 2],
    blocksize: usize,
    dtype: DType,
    /// In the byte stream.
    packed: Range<usize>,
    scales: Scales,
}

#[derive(Clone)]
enum Scales {
    /// In the f32 stream.
    F32(Range<usize>),
    /// The codes in the byte stream, the second-level absmax in the f32 stream; the offset and the 256-entry code
    /// are replicated (a few hundred bytes per weight).
    Nested { q: Range<usize>, absmax2: Range<usize>, offset: f32, code: Tensor },
}

/// Appends `v` to `stream`; where it landed.
fn push<T: Copy>(stream: &mut Vec<T>, v: &[T]) -> Range<usize> {
    let start = stream.len();
    stream.extend_from_slice(v);
    start..stream.len()
}

/// Rank `rank`'s piece of `stream` split in `world` equal pieces (zero-padded at the end), as a tensor.
fn piece<T: Copy + Default + qlora_runtime::Element>(stream: &[T], rank: usize, world: usize) -> Result<Tensor> {
    let each = stream.len().div_ceil(world);
    let mut mine = vec![T::default(); each];
    let start = (rank * each).min(stream.len());
    let end = (start + each).min(stream.len());
    mine[..end - start].copy_from_slice(&stream[start..end]);
    Tensor::from_vec(mine, &[each])
}

impl ShardedBase {
    /// No layers yet: [`ShardedBase::take_layer`] adds them in order, keeping the shards on `device` (the rank's
    /// GPU as a model loads, so that its host holds one layer at a time and no shards).
    pub fn new(group: Arc<dyn Communicator>, device: Device) -> Self {
        let (prefetched, counts) = (RefCell::new(None), Cell::new(GatherCounts::default()));
        ShardedBase { group, device, layers: Vec::new(), prefetched, counts }
    }

    /// How the gathers so far went: how many found their layer prefetched.
    pub fn counts(&self) -> GatherCounts {
        self.counts.get()
    }

    pub fn group(&self) -> &dyn Communicator {
        &*self.group
    }

    /// Takes the next decoder layer's NF4 weights: this rank keeps its piece of them and the layer's projections
    /// keep only their shapes ([`BaseWeight::Sharded`]). Dense bases stay in the layer.
    pub fn take_layer(&mut self, layer: &mut DecoderLayer) -> Result<()> {
        let (mut bytes, mut floats, mut weights) = (Vec::new(), Vec::new(), Vec::new());
        let on = self.device;
        for (slot, proj) in layer.projections_mut().into_iter().enumerate() {
            let BaseWeight::Nf4(w) = &proj.base else { continue };
            // A weight on a GPU keeps its host state beside the device copy: the split reads that.
            let host = w.to_device(Device::Cpu)?;
            let packed = push(&mut bytes, &host.packed);
            let scales = match &*host.absmax {
                Absmax::F32(a) => Scales::F32(push(&mut floats, a)),
                Absmax::Nested { q, absmax2, offset, code } => Scales::Nested {
                    q: push(&mut bytes, q),
                    absmax2: push(&mut floats, absmax2),
                    offset: *offset,
                    code: Tensor::from_slice(code, &[code.len()])?.to_device(on)?,
                },
            };
            weights.push(Layout { slot, shape: w.shape, blocksize: w.blocksize, dtype: w.dtype, packed, scales });
            proj.base = BaseWeight::Sharded { shape: w.shape, device: on };
        }
        let (rank, world) = (self.group.rank(), self.group.world_size());
        let (bytes, floats) = tagged(Category::Weights, || {
            Ok::<_, Error>((piece(&bytes, rank, world)?.to_device(on)?, piece(&floats, rank, world)?.to_device(on)?))
        })?;
        self.layers.push(LayerShard { bytes, floats, weights });
        Ok(())
    }

    /// Layer `index` (`layer`, whose NF4 weights this holds) with its weights gathered whole from every rank, on
    /// this rank's device (counted as weights in the peak's split), having started the gather of layer `next` (the
    /// one expected to run next, if any). A collective: every rank gathers the same layers in the same order.
    pub fn gather(&self, index: usize, layer: &DecoderLayer, next: Option<usize>) -> Result<DecoderLayer> {
        tagged(Category::Weights, || self.gather_layer(index, layer, next))
    }

    /// Starts the gather of layer `index`'s streams (None for a layer without NF4 weights: nothing to gather).
    fn start(&self, index: usize) -> Result<Option<Inbound>> {
        let shard = &self.layers[index];
        if shard.weights.is_empty() {
            return Ok(None);
        }
        let bytes = self.group.start_all_gather_tensor(&shard.bytes)?;
        let floats = self.group.start_all_gather_tensor(&shard.floats)?;
        Ok(Some(Inbound { index, bytes, floats }))
    }

    fn gather_layer(&self, index: usize, layer: &DecoderLayer, next: Option<usize>) -> Result<DecoderLayer> {
        let shard = self.layers.get(index).ok_or_else(|| {
            Error::invalid("gather", format!("layer {index} of a model sharded in {} layers", self.layers.len()))
        })?;
        let mut counts = self.counts.get();
        let inbound = match self.prefetched.take() {
            Some(inbound) if inbound.index == index => {
                counts.prefetched += 1;
                Some(inbound)
            }
            // A prefetch of another layer is dropped (it completes first: see `Pending`).
            _ => {
                counts.on_demand += usize::from(!shard.weights.is_empty());
                self.start(index)?
            }
        };
        self.counts.set(counts);
        if let Some(next) = next.filter(|&n| n < self.layers.len()) {
            *self.prefetched.borrow_mut() = self.start(next)?;
        }
        let mut whole = layer.clone();
        let Some(inbound) = inbound else { return Ok(whole) };
        let (bytes, floats) = (inbound.bytes.finish()?, inbound.floats.finish()?);
        let cut = |stream: &Tensor, r: &Range<usize>| -> Result<Tensor> {
            // A view would be cheaper, but the kernels read a buffer from its start: each part is made whole.
            stream.narrow(0, r.start, r.len())?.try_contiguous()
        };
        let projections = whole.projections_mut();
        for w in &shard.weights {
            let absmax = match &w.scales {
                Scales::F32(r) => AbsmaxTensors::F32(cut(&floats, r)?),
                Scales::Nested { q, absmax2, offset, code } => AbsmaxTensors::Nested {
                    q: cut(&bytes, q)?,
                    absmax2: cut(&floats, absmax2)?,
                    offset: *offset,
                    code: code.clone(),
                },
            };
            let parts = Nf4Tensors { packed: cut(&bytes, &w.packed)?, absmax };
            projections[w.slot].base = BaseWeight::Nf4(Nf4Weight::from_parts(w.shape, w.blocksize, w.dtype, parts)?);
        }
        Ok(whole)
    }

    /// The shards on `device` (the same group).
    pub fn to_device(&self, device: Device) -> Result<ShardedBase> {
        tagged(Category::Weights, || self.moved(device))
    }

    fn moved(&self, device: Device) -> Result<ShardedBase> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let scales = |s: &Scales| -> Result<Scales> {
                    Ok(match s {
                        Scales::F32(r) => Scales::F32(r.clone()),
                        Scales::Nested { q, absmax2, offset, code } => Scales::Nested {
                            q: q.clone(),
                            absmax2: absmax2.clone(),
                            offset: *offset,
                            code: code.to_device(device)?,
                        },
                    })
                };
                let weights = l
                    .weights
                    .iter()
                    .map(|w| Ok(Layout { scales: scales(&w.scales)?, ..w.clone() }))
                    .collect::<Result<Vec<_>>>()?;
                Ok(LayerShard { bytes: l.bytes.to_device(device)?, floats: l.floats.to_device(device)?, weights })
            })
            .collect::<Result<Vec<_>>>()?;
        let (prefetched, counts) = (RefCell::new(None), Cell::new(self.counts.get()));
        Ok(ShardedBase { group: self.group.clone(), device, layers, prefetched, counts })
    }

    /// Bytes this rank holds.
    pub fn size_in_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes.size_in_bytes() + l.floats.size_in_bytes()).sum()
    }
}
