//! Frozen base weights: dense, or packed NF4 as bitsandbytes stores them.
//!
//! The NF4 numerics (code, rounding, packing, nested absmax) live in `qlora_kernels::nf4`; this module holds
//! the quantization state beside the packed bytes and turns it back into a tensor. A weight moved to a GPU keeps
//! its host state and gains a device copy of it ([`Nf4Tensors`]), uploaded once; it then dequantizes on the GPU. A
//! weight gathered on a GPU from the shards of a sharded base ([`Nf4Weight::from_parts`]) has only the device copy.
//! Decoding's product against the packed weight, [`Nf4Weight::gemv`], is `quant/gemv.rs`.

use crate::cuda::{buf, buffer_mut, output};
use crate::storage::CudaElement;
use crate::transfer::cuda_device;
use crate::{DType, Device, Error, Result, Tensor};
pub use gemv::LoraUp;
use half::{bf16, f16};
pub use qlora_kernels::cuda::nf4::GEMV_MAX_ROWS;
use qlora_kernels::cuda::{nf4 as gnf4, DeviceBuffer};
use qlora_kernels::nf4::{self, NestedAbsmax, DYNAMIC_MAP_SIGNED, NF4_CODE};
use std::sync::Arc;

mod gemv;

/// The per-block scales of an NF4 weight.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block (bitsandbytes without double quantization: 4.5 bits/param at block 64).
    F32(Vec<f32>),
    /// Double quantization (≈4.127 bits/param at block 64): 8-bit codes of (absmax − offset) in blocks of 256.
    /// `code` is the checkpoint's `nested_quant_map` (bitsandbytes' signed dynamic map when we quantize).
    Nested { q: Vec<u8>, absmax2: Vec<f32>, offset: f32, code: Vec<f32> },
}

impl Absmax {
    /// The f32 absmax per block.
    pub fn resolve(&self) -> Vec<f32> {
        match self {
            Absmax::F32(v) => v.clone(),
            Absmax::Nested { q, absmax2, offset, code } => {
                let mut out = vec![0.0f32; q.len()];
                nf4::dequantize_absmax_nested(q, absmax2, *offset, code, &mut out);
                out
            }
        }
    }

    fn size_in_bytes(&self) -> usize {
        match self {
            Absmax::F32(v) => 4 * v.len(),
            // The offset is one f32 per tensor.
            Absmax::Nested { q, absmax2, .. } => q.len() + 4 * absmax2.len() + 4,
        }
    }
}

/// The nested absmax code is bitsandbytes' 8-bit dynamic map: 256 entries, what the dequantization kernel indexes.
fn check_code(len: usize) -> Result<()> {
    if len != 256 {
        return Err(Error::invalid("nf4", format!("the nested absmax code has {len} entries, not 256")));
    }
    Ok(())
}

/// A weight [out, in] stored as bitsandbytes NF4: packed nibbles (first element in the high nibble) and
/// per-block absmax. `dtype` is the dtype it was quantized from and dequantizes to (bnb's `quant_state.dtype`).
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    pub shape: [usize; 2],
    pub blocksize: usize,
    pub dtype: DType,
    pub packed: Arc<Vec<u8>>,
    /// Shared, so cloning a weight (a backward keeping its base) copies no scales.
    pub absmax: Arc<Absmax>,
    /// The same state on a GPU, when the weight was moved there: dequantization then runs on that device. A weight
    /// gathered on a GPU ([`Nf4Weight::from_parts`]) has only this: `packed` is empty and `absmax` is `F32([])`.
    pub device: Option<Arc<Nf4Tensors>>,
}

/// An NF4 weight's packed nibbles (u8) and scales as tensors of one device: a weight's device copy, or the pieces a
/// sharded base gathers ([`Nf4Weight::from_parts`]). Tensors share their storage, so clones are free.
#[derive(Clone, Debug)]
pub struct Nf4Tensors {
    pub packed: Tensor,
    pub absmax: AbsmaxTensors,
}

/// [`Absmax`] as tensors.
// One per weight, behind the weight's Arc: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum AbsmaxTensors {
    /// f32, one per block.
    F32(Tensor),
    /// Rebuilt to f32 by each dequantization launch, per block, in the dequantization kernel itself.
    Nested { q: Tensor, absmax2: Tensor, offset: f32, code: Tensor },
}

/// The device copy derives from the host fields, so two weights with equal host state are equal when they sit on
/// the same device.
impl PartialEq for Nf4Tensors {
    fn eq(&self, other: &Self) -> bool {
        self.packed.device() == other.packed.device()
    }
}

impl Nf4Tensors {
    fn upload(w: &Nf4Weight, device: Device) -> Result<Self> {
        let up = |t: Tensor| t.to_device(device);
        let vec_u8 = |v: &[u8]| Tensor::from_slice(v, &[v.len()]);
        let vec_f32 = |v: &[f32]| Tensor::from_slice(v, &[v.len()]);
        let absmax = match &*w.absmax {
            Absmax::F32(v) => AbsmaxTensors::F32(up(vec_f32(v)?)?),
            Absmax::Nested { q, absmax2, offset, code } => {
                check_code(code.len())?;
                AbsmaxTensors::Nested {
                    q: up(vec_u8(q)?)?,
                    absmax2: up(vec_f32(absmax2)?)?,
                    offset: *offset,
                    code: up(vec_f32(code)?)?,
                }
            }
        };
        Ok(Nf4Tensors { packed: up(vec_u8(&w.packed)?)?, absmax })
    }

    fn device(&self) -> Device {
        self.packed.device()
    }

    /// Bytes held, as [`Absmax`] counts them.
    fn size_in_bytes(&self) -> usize {
        self.packed.size_in_bytes()
            + match &self.absmax {
                AbsmaxTensors::F32(a) => a.size_in_bytes(),
                AbsmaxTensors::Nested { q, absmax2, .. } => q.size_in_bytes() + absmax2.size_in_bytes() + 4,
            }
    }

    /// The state on the host, read back.
    fn to_host(&self) -> Result<(Vec<u8>, Absmax)> {
        let absmax = match &self.absmax {
            AbsmaxTensors::F32(a) => Absmax::F32(a.try_to_vec()?),
            AbsmaxTensors::Nested { q, absmax2, offset, code } => Absmax::Nested {
                q: q.try_to_vec()?,
                absmax2: absmax2.try_to_vec()?,
                offset: *offset,
                code: code.try_to_vec()?,
            },
        };
        Ok((self.packed.try_to_vec()?, absmax))
    }

    /// The scales as the dequantization kernel takes them (a double-quantized absmax is rebuilt inside it).
    fn scales(&self) -> gnf4::Nf4Scales<'_> {
        match &self.absmax {
            AbsmaxTensors::F32(a) => gnf4::Nf4Scales::Absmax(buf(a)),
            AbsmaxTensors::Nested { q, absmax2, offset, code } => {
                gnf4::Nf4Scales::Nested { qabsmax: buf(q), absmax2: buf(absmax2), code2: buf(code), offset: *offset }
            }
        }
    }

    /// w (each row times its factor in `rows`: f32 \[out\] on the device, whole) → out[..out·in] on the device, in
    /// one launch: bit-identical to the CPU's dequantization.
    fn launch<T: gnf4::Nf4Output>(
        &self,
        w: &Nf4Weight,
        rows: Option<&Tensor>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let (packed, scales, n) = (buf(&self.packed), self.scales(), w.elem_count());
        let rows = rows.map(|g| gnf4::RowScale { scale: buf(g), row_len: w.shape[1] });
        gnf4::dequantize_nf4_rows_into(packed, scales, rows, w.blocksize, n, out, 0)
            .map_err(Error::cuda("nf4 dequantize"))
    }

    /// w: [out, in] in `dtype` (f32, bf16 or f16), dequantized on the device.
    fn dequantize(&self, w: &Nf4Weight, dtype: DType) -> Result<Tensor> {
        fn go<T: gnf4::Nf4Output + CudaElement>(d: &Nf4Tensors, w: &Nf4Weight, ordinal: usize) -> Result<Tensor> {
            let mut out = cuda_device(ordinal)?.alloc::<T>(w.elem_count()).map_err(Error::cuda(OP))?;
            d.launch(w, None, &mut out)?;
            Ok(output(out, &w.shape))
        }
        const OP: &str = "nf4 dequantize";
        let device = self.packed.device();
        let Device::Cuda(ordinal) = device else {
            return Err(Error::invalid(OP, "the device copy of an NF4 weight is on the CPU"));
        };
        match dtype {
            DType::F32 => go::<f32>(self, w, ordinal),
            DType::BF16 => go::<bf16>(self, w, ordinal),
            DType::F16 => go::<f16>(self, w, ordinal),
            _ => Err(Error::Unsupported { op: OP, device, why: "CUDA dequantizes NF4 to f32, bf16 or f16" }),
        }
    }

    /// w (its rows scaled by `rows`, as [`Nf4Tensors::launch`] takes them) → scratch[..out·in] (scratch on this
    /// device, at least that long), in scratch's dtype.
    fn dequantize_into(&self, w: &Nf4Weight, rows: Option<&Tensor>, scratch: &mut Tensor) -> Result<()> {
        const OP: &str = "nf4 dequantize_into";
        match scratch.dtype() {
            DType::F32 => self.launch(w, rows, buffer_mut::<f32>(OP, scratch)?),
            DType::BF16 => self.launch(w, rows, buffer_mut::<bf16>(OP, scratch)?),
            DType::F16 => self.launch(w, rows, buffer_mut::<f16>(OP, scratch)?),
            _ => Err(Error::Unsupported {
                op: OP,
                device: scratch.device(),
                why: "CUDA dequantizes NF4 to f32, bf16 or f16",
            }),
        }
    }
}

impl Nf4Weight {
    /// Quantizes `w` ([out, in], f32/bf16/f16) exactly as `bitsandbytes.functional.quantize_4bit(w.cuda(),
    /// blocksize, compress_statistics=double_quant, quant_type="nf4")`. The nested offset may differ from bnb's
    /// in the last ulp (see `nf4::absmax_mean`).
    pub fn quantize(w: &Tensor, blocksize: usize, double_quant: bool) -> Result<Self> {
        let [rows, cols] = *w.shape() else {
            return Err(Error::shape("nf4 quantize", format!("weight must be 2-D [out, in], got {:?}", w.shape())));
        };
        if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
            return Err(Error::invalid(
                "nf4 quantize",
                format!("blocksize must be a power of two in 32..=4096, got {blocksize}"),
            ));
        }
        let n = rows * cols;
        let mut packed = vec![0u8; nf4::nf4_packed_len(n)];
        let mut absmax = vec![0f32; nf4::nf4_num_blocks(n, blocksize)];
        match w.dtype() {
            DType::BF16 => nf4::quantize_nf4(&w.values::<bf16>(), blocksize, &mut packed, &mut absmax),
            DType::F16 => nf4::quantize_nf4(&w.values::<f16>(), blocksize, &mut packed, &mut absmax),
            DType::F32 | DType::F64 => nf4::quantize_nf4(&w.values::<f32>(), blocksize, &mut packed, &mut absmax),
            other => return Err(Error::DType { op: "nf4 quantize", expected: DType::BF16, got: other }),
        }
        let absmax = if double_quant && !absmax.is_empty() {
            let NestedAbsmax { offset, qabsmax, absmax2 } = nf4::quantize_absmax_nested(&absmax);
            Absmax::Nested { q: qabsmax, absmax2, offset, code: DYNAMIC_MAP_SIGNED.to_vec() }
        } else {
            Absmax::F32(absmax)
        };
        let dtype = if w.dtype() == DType::F64 { DType::F32 } else { w.dtype() };
        Ok(Nf4Weight {
            shape: [rows, cols],
            blocksize,
            dtype,
            packed: Arc::new(packed),
            absmax: Arc::new(absmax),
            device: None,
        })
    }

    /// The weight of `shape` quantized from `dtype` in blocks of `blocksize` whose state is `parts` (as a sharded
    /// base gathers it): on the CPU an ordinary weight; on a GPU a weight with only its device copy (no bytes cross
    /// to the host), which dequantizes and multiplies there like any other but cannot move to another device.
    pub fn from_parts(shape: [usize; 2], blocksize: usize, dtype: DType, parts: Nf4Tensors) -> Result<Nf4Weight> {
        const OP: &str = "nf4 from_parts";
        let n = shape[0] * shape[1];
        let blocks = nf4::nf4_num_blocks(n, blocksize);
        let sizes = match &parts.absmax {
            AbsmaxTensors::F32(a) => vec![(a, DType::F32, blocks)],
            AbsmaxTensors::Nested { q, absmax2, code, .. } => {
                check_code(code.elem_count())?;
                vec![
                    (q, DType::U8, blocks),
                    (absmax2, DType::F32, blocks.div_ceil(nf4::NESTED_BLOCKSIZE)),
                    (code, DType::F32, 256),
                ]
            }
        };
        for (t, dtype, len) in [(&parts.packed, DType::U8, nf4::nf4_packed_len(n))].into_iter().chain(sizes) {
            if t.dtype() != dtype || t.shape() != [len] || t.device() != parts.device() {
                let (got, device) = (t.shape(), t.device());
                let want = format!("{dtype:?} [{len}] on {}", parts.device());
                return Err(Error::invalid(
                    OP,
                    format!("a part of {shape:?} is {:?} {got:?} on {device}, not {want}", t.dtype()),
                ));
            }
        }
        let weight = |packed, absmax, device| Nf4Weight {
            shape,
            blocksize,
            dtype,
            packed: Arc::new(packed),
            absmax: Arc::new(absmax),
            device,
        };
        Ok(match parts.device() {
            Device::Cpu => {
                let (packed, absmax) = parts.to_host()?;
                weight(packed, absmax, None)
            }
            Device::Cuda(_) => weight(Vec::new(), Absmax::F32(Vec::new()), Some(Arc::new(parts))),
        })
    }

    /// Whether the host state is here: false only for a weight [`Nf4Weight::from_parts`] put together on a GPU.
    fn has_host_state(&self) -> bool {
        self.device.is_none() || !self.packed.is_empty() || self.elem_count() == 0
    }

    /// Where dequantization runs.
    pub fn device(&self) -> Device {
        self.device.as_ref().map_or(Device::Cpu, |d| d.device())
    }

    /// This weight with its state on `device`: a GPU gets one upload of the packed bytes and scales (the host copy
    /// stays, shared); the CPU drops the device copy. A weight that exists only on its GPU stays there.
    pub fn to_device(&self, device: Device) -> Result<Nf4Weight> {
        if device != self.device() && !self.has_host_state() {
            let why =
                format!("{:?} was gathered on {} and has no host copy to move to {device}", self.shape, self.device());
            return Err(Error::invalid("nf4 to_device", why));
        }
        let moved = match device {
            _ if device == self.device() => return Ok(self.clone()),
            Device::Cpu => None,
            Device::Cuda(_) => Some(Arc::new(Nf4Tensors::upload(self, device)?)),
        };
        Ok(Nf4Weight { device: moved, ..self.clone() })
    }

    /// Whether every row is whole blocks (in a multiple of the blocksize, as every model's projections are): what
    /// [`Nf4Weight::dequantize_scaled_into`] needs.
    pub fn rows_are_whole_blocks(&self) -> bool {
        self.shape[1] % self.blocksize == 0
    }

    pub fn elem_count(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// The weight as a dense tensor of `dtype` (each value `code[q]·absmax` in f32, rounded once), on the weight's
    /// device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        if let Some(d) = &self.device {
            return d.dequantize(self, dtype);
        }
        let n = self.elem_count();
        let absmax = self.absmax.resolve();
        match dtype {
            DType::F32 => {
                let mut out = vec![0f32; n];
                nf4::dequantize_nf4(&self.packed, &absmax, self.blocksize, &mut out);
                Tensor::from_vec(out, &self.shape)
            }
            DType::BF16 => {
                let mut out = vec![bf16::ZERO; n];
                nf4::dequantize_nf4(&self.packed, &absmax, self.blocksize, &mut out);
                Tensor::from_vec(out, &self.shape)
            }
            DType::F16 => {
                let mut out = vec![f16::ZERO; n];
                nf4::dequantize_nf4(&self.packed, &absmax, self.blocksize, &mut out);
                Tensor::from_vec(out, &self.shape)
            }
            other => Err(Error::DType { op: "nf4 dequantize", expected: DType::BF16, got: other }),
        }
    }

    /// The weight dequantized into the first out·in elements of `scratch` and returned as an [out, in] view of
    /// them: a step dequantizes each weight into one scratch buffer (any shape, at least as many elements as the
    /// largest weight, of the dtype to compute in, on the weight's device) instead of allocating per weight. The
    /// values are [`Nf4Weight::dequantize`]'s to the bit; the rest of `scratch` is left as it was. Copy-on-write
    /// holds: while a view from an earlier call (one saved for backward, say) shares scratch's storage, scratch is
    /// copied before the write and that view keeps its values.
    pub fn dequantize_into(&self, scratch: &mut Tensor) -> Result<Tensor> {
        self.dequantize_rows_into(scratch, None)
    }

    /// [`Nf4Weight::dequantize_into`] of diag(row_scale)·W: row_scale \[out\] (used as f32; on a GPU f32 or bf16,
    /// the dtypes it casts between) multiplies each block's absmax before the codes do (one f32 rounding, the same on
    /// both devices: [`qlora_kernels::nf4::dequantize_nf4_rows_scaled`]), so the scaled weight costs no pass of its
    /// own. Needs [`Nf4Weight::rows_are_whole_blocks`].
    pub fn dequantize_scaled_into(&self, scratch: &mut Tensor, row_scale: &Tensor) -> Result<Tensor> {
        const OP: &str = "nf4 dequantize_scaled_into";
        let [out_f, in_f] = self.shape;
        if row_scale.shape() != [out_f] {
            return Err(Error::shape(
                OP,
                format!("row factors {:?} for a weight of {:?}", row_scale.shape(), self.shape),
            ));
        }
        if !self.rows_are_whole_blocks() {
            return Err(Error::shape(
                OP,
                format!("rows of {in_f} are not whole blocks of {} in a weight of {:?}", self.blocksize, self.shape),
            ));
        }
        if row_scale.device() != self.device() {
            return Err(Error::DeviceMismatch { op: OP, a: self.device(), b: row_scale.device() });
        }
        self.dequantize_rows_into(scratch, Some(row_scale))
    }

    fn dequantize_rows_into(&self, scratch: &mut Tensor, row_scale: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "nf4 dequantize_into";
        let n = self.elem_count();
        if scratch.elem_count() < n {
            return Err(Error::shape(
                OP,
                format!("scratch of {} elements for a weight of {:?}", scratch.elem_count(), self.shape),
            ));
        }
        if scratch.device() != self.device() {
            return Err(Error::DeviceMismatch { op: OP, a: self.device(), b: scratch.device() });
        }
        // On a device try_to_dtype returns a whole tensor, as the launch reads it.
        let rows = row_scale.map(|g| g.try_to_dtype(DType::F32)).transpose()?;
        if let Some(d) = &self.device {
            d.dequantize_into(self, rows.as_ref(), scratch)?;
        } else {
            let absmax = self.absmax.resolve();
            let rows = rows.map(|g| g.to_vec::<f32>());
            let (packed, bs, in_f) = (&self.packed, self.blocksize, self.shape[1]);
            fn go<T: nf4::WeightElem>(p: &[u8], a: &[f32], bs: usize, rows: Option<(&[f32], usize)>, out: &mut [T]) {
                match rows {
                    None => nf4::dequantize_nf4(p, a, bs, out),
                    Some((g, row_len)) => nf4::dequantize_nf4_rows_scaled(p, a, bs, g, row_len, out),
                }
            }
            let rows = rows.as_deref().map(|g| (g, in_f));
            match scratch.dtype() {
                DType::F32 => scratch.update::<f32>(|s| go(packed, &absmax, bs, rows, &mut s[..n]))?,
                DType::BF16 => scratch.update::<bf16>(|s| go(packed, &absmax, bs, rows, &mut s[..n]))?,
                DType::F16 => scratch.update::<f16>(|s| go(packed, &absmax, bs, rows, &mut s[..n]))?,
                other => return Err(Error::DType { op: OP, expected: DType::BF16, got: other }),
            }
        }
        scratch.reshape(&[scratch.elem_count()])?.narrow(0, 0, n)?.reshape(&self.shape)
    }

    /// Bytes held: packed nibbles plus scales (on the device for a weight that exists only there).
    pub fn size_in_bytes(&self) -> usize {
        match &self.device {
            Some(d) if !self.has_host_state() => d.size_in_bytes(),
            _ => self.packed.len() + self.absmax.size_in_bytes(),
        }
    }

    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.size_in_bytes() as f64 / self.elem_count().max(1) as f64
    }

    /// The NF4 code this format dequantizes with (checkpoints repeat it as `weight.quant_map`).
    pub fn code() -> &'static [f32; 16] {
        &NF4_CODE
    }
}

/// A frozen linear weight [out, in]: plain LoRA keeps it dense (bf16), QLoRA as NF4.
#[derive(Clone, Debug)]
pub enum BaseWeight {
    Dense(Tensor),
    Nf4(Nf4Weight),
    /// An NF4 weight split across the ranks of a group: its bytes live with its layer's shard, which gathers the
    /// layer's weights whole just before the layer runs (`qlora_models::sharded`); it cannot be used as it is.
    Sharded {
        shape: [usize; 2],
        device: Device,
    },
}

impl BaseWeight {
    pub fn shape(&self) -> [usize; 2] {
        match self {
            BaseWeight::Dense(t) => [t.shape()[0], t.shape()[1]],
            BaseWeight::Nf4(w) => w.shape,
            BaseWeight::Sharded { shape, .. } => *shape,
        }
    }

    /// The weight in `dtype` for compute (CPU: f32; a dense weight already in `dtype` is returned as is), on the
    /// weight's device.
    pub fn materialize(&self, dtype: DType) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => t.try_to_dtype(dtype),
            BaseWeight::Nf4(w) if dtype == DType::F64 => w.dequantize(DType::F32)?.try_to_dtype(DType::F64),
            BaseWeight::Nf4(w) => w.dequantize(dtype),
            BaseWeight::Sharded { shape, .. } => Err(Error::invalid(
                "base weight",
                format!("a sharded weight {shape:?} is used only as its layer gathers it whole"),
            )),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            BaseWeight::Dense(t) => t.device(),
            BaseWeight::Nf4(w) => w.device(),
            BaseWeight::Sharded { device, .. } => *device,
        }
    }

    /// The weight on `device` (NF4 stays packed: see [`Nf4Weight::to_device`]).
    pub fn to_device(&self, device: Device) -> Result<BaseWeight> {
        Ok(match self {
            BaseWeight::Dense(t) => BaseWeight::Dense(t.to_device(device)?),
            BaseWeight::Nf4(w) => BaseWeight::Nf4(w.to_device(device)?),
            BaseWeight::Sharded { shape, .. } => BaseWeight::Sharded { shape: *shape, device },
        })
    }

    /// Bytes held (none for a sharded weight: its layer's shard holds them).
    pub fn size_in_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(t) => t.size_in_bytes(),
            BaseWeight::Nf4(w) => w.size_in_bytes(),
            BaseWeight::Sharded { .. } => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_kernels::Rng;

    #[test]
    fn quantize_dequantize_round_trip_and_accounting() {
        let mut rng = Rng::new(1);
        let w = Tensor::randn(&[256, 1024], 0.02, DType::BF16, &mut rng);
        for (dq, bits) in [(false, 4.5), (true, 4.127)] {
            let q = Nf4Weight::quantize(&w, 64, dq).unwrap();
            assert!((q.bits_per_param() - bits).abs() < 1e-3, "{} vs {bits}", q.bits_per_param());
            let back = q.dequantize(DType::F32).unwrap().to_vec::<f32>();
            let orig = w.to_vec::<f32>();
            let absmax = q.absmax.resolve();
            let true_absmax: Vec<f32> = orig.chunks(64).map(|b| b.iter().fold(0f32, |m, x| m.max(x.abs()))).collect();
            for (i, (a, b)) in back.iter().zip(&orig).enumerate() {
                // Half the widest NF4 gap (−0.6962 − (−1.0)) times the block's scale, plus what double quantization
                // moved the scale itself, bounds the error.
                let (t, r) = (true_absmax[i / 64], absmax[i / 64]);
                let bound = 0.1520 * t * 1.001 + (t - r).abs();
                assert!((a - b).abs() <= bound, "[{i}] {a} vs {b} (bound {bound})");
            }
            assert_eq!(q.dequantize(DType::BF16).unwrap().dtype(), DType::BF16);
        }
        assert!(Nf4Weight::quantize(&w, 48, false).is_err());
        assert!(Nf4Weight::quantize(&Tensor::zeros(&[4], DType::F32), 64, false).is_err());
    }

    /// A weight put together from its state as tensors (what a sharded base gathers) is the weight, on the CPU;
    /// parts of the wrong size or dtype are an error naming the part.
    #[test]
    fn a_weight_from_its_parts_is_the_weight() {
        let mut rng = Rng::new(3);
        let w = Tensor::randn(&[40, 70], 0.02, DType::BF16, &mut rng);
        for double_quant in [false, true] {
            let q = Nf4Weight::quantize(&w, 64, double_quant).unwrap();
            let u8s = |v: &[u8]| Tensor::from_slice(v, &[v.len()]).unwrap();
            let f32s = |v: &[f32]| Tensor::from_slice(v, &[v.len()]).unwrap();
            let absmax = match &*q.absmax {
                Absmax::F32(a) => AbsmaxTensors::F32(f32s(a)),
                Absmax::Nested { q, absmax2, offset, code } => {
                    AbsmaxTensors::Nested { q: u8s(q), absmax2: f32s(absmax2), offset: *offset, code: f32s(code) }
                }
            };
            let parts = Nf4Tensors { packed: u8s(&q.packed), absmax };
            assert_eq!(Nf4Weight::from_parts(q.shape, 64, DType::BF16, parts.clone()).unwrap(), q);
            let short = Nf4Tensors { packed: u8s(&q.packed[1..]), ..parts.clone() };
            let e = Nf4Weight::from_parts(q.shape, 64, DType::BF16, short).unwrap_err().to_string();
            assert!(e.contains("a part of [40, 70] is U8 [1399] on cpu, not U8 [1400] on cpu"), "{e}");
            assert!(Nf4Weight::from_parts(q.shape, 32, DType::BF16, parts).is_err(), "the block count is checked");
        }
    }

    /// diag(g)·W into the scratch: each row within one rounding of W's row times its factor (the factor folds into
    /// the block absmax), the tail left alone; factors of the wrong length and rows that are not whole blocks are
    /// errors naming the weight.
    #[test]
    fn dequantize_scaled_into_scales_each_row() {
        let mut rng = Rng::new(3);
        let w = Nf4Weight::quantize(&Tensor::randn(&[6, 128], 0.02, DType::F32, &mut rng), 64, true).unwrap();
        let g = Tensor::from_vec(vec![0.5f32, 2.0, 0.0, -1.0, 1.0, 3.0e-3], &[6]).unwrap();
        let plain = w.dequantize(DType::F32).unwrap().to_vec::<f32>();
        for dtype in [DType::F32, DType::BF16] {
            let mut scratch = Tensor::full(&[6 * 128 + 3], 9.0, dtype);
            let got = w.dequantize_scaled_into(&mut scratch, &g.to_dtype(dtype)).unwrap();
            assert_eq!(got.shape(), &[6, 128]);
            let gv = g.to_dtype(dtype).to_vec::<f32>();
            for (i, (&v, &p)) in got.to_vec::<f32>().iter().zip(&plain).enumerate() {
                let exact = p as f64 * gv[i / 128] as f64;
                let tol = if dtype == DType::F32 { 2.0 * f32::EPSILON as f64 } else { 1.0 / 128.0 };
                assert!((v as f64 - exact).abs() <= tol * exact.abs(), "{dtype:?} [{i}]: {v} vs {exact}");
            }
            assert_eq!(scratch.to_vec::<f64>()[6 * 128..], [9.0; 3]);
        }
        let mut scratch = Tensor::zeros(&[6 * 128], DType::F32);
        let e = w.dequantize_scaled_into(&mut scratch, &Tensor::ones(&[5], DType::F32)).unwrap_err().to_string();
        assert!(e.contains("row factors [5] for a weight of [6, 128]"), "{e}");
        let odd = Nf4Weight::quantize(&Tensor::randn(&[4, 96], 0.02, DType::F32, &mut rng), 64, false).unwrap();
        let e = odd.dequantize_scaled_into(&mut scratch, &Tensor::ones(&[4], DType::F32)).unwrap_err().to_string();
        assert!(e.contains("rows of 96 are not whole blocks of 64"), "{e}");
    }

    #[test]
    fn dequantize_into_reuses_one_scratch_and_keeps_earlier_views() {
        let mut rng = Rng::new(2);
        let big = Nf4Weight::quantize(&Tensor::randn(&[48, 96], 0.02, DType::F32, &mut rng), 64, true).unwrap();
        let small = Nf4Weight::quantize(&Tensor::randn(&[7, 33], 0.02, DType::F32, &mut rng), 32, false).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let mut scratch = Tensor::full(&[48 * 96 + 5], 9.0, dtype);
            let w = big.dequantize_into(&mut scratch).unwrap();
            assert_eq!((w.shape(), w.dtype()), (&[48, 96][..], dtype));
            assert_eq!(w.to_vec::<f64>(), big.dequantize(dtype).unwrap().to_vec::<f64>(), "{dtype:?}");
            assert_eq!(scratch.to_vec::<f64>()[48 * 96..], [9.0; 5], "the tail is left alone");
            // The big weight's view is still alive: the next write goes to a copy, so the view keeps its values.
            let v = small.dequantize_into(&mut scratch).unwrap();
            assert_eq!(v.to_vec::<f64>(), small.dequantize(dtype).unwrap().to_vec::<f64>());
            assert_eq!(w.to_vec::<f64>(), big.dequantize(dtype).unwrap().to_vec::<f64>());
            assert!(v.shares_storage(&scratch) && !w.shares_storage(&scratch));
        }
        let mut short = Tensor::zeros(&[48 * 96 - 1], DType::F32);
        assert!(big.dequantize_into(&mut short).unwrap_err().to_string().contains("scratch of"));
        assert!(big.dequantize_into(&mut Tensor::zeros(&[48 * 96], DType::I32)).is_err());
    }
}
