//! Decoding's product with packed NF4 weights, [`Nf4Weight::gemv`] and [`Nf4Weight::gemv_group`]: on a GPU the NF4
//! GEMV kernels (a projection group's weights in one launch, LoRA's up-projection on the write), on the CPU their
//! reference.

use super::{Nf4Weight, GEMV_MAX_ROWS};
use crate::cuda::{buf, output};
use crate::ops::linalg::rows_in_place;
use crate::storage::CudaElement;
use crate::transfer::cuda_device;
use crate::{DType, Device, Error, Result, Tensor};
use half::bf16;
use qlora_kernels::cuda::nf4 as gnf4;
use qlora_kernels::nf4;

/// LoRA's up-projection that [`Nf4Weight::gemv`] adds to its product: alpha·U·Bᵀ with U: [rows, r] (any view, such
/// as a projection's column block of its group's U, read in place on a GPU) and B: [out, r].
#[derive(Clone, Copy, Debug)]
pub struct LoraUp<'a> {
    pub u: &'a Tensor,
    pub b: &'a Tensor,
    pub alpha: f64,
}

impl LoraUp<'_> {
    /// The rank, after checking the shapes against a product of `rows` rows and `out_f` outputs.
    fn check(&self, rows: usize, out_f: usize) -> Result<usize> {
        match (self.u.shape(), self.b.shape()) {
            ([ur, r], [bo, br]) if *ur == rows && *bo == out_f && r == br && *r > 0 => Ok(*r),
            (u, b) => Err(Error::shape(
                "nf4 gemv",
                format!("LoRA U {u:?} and B {b:?} for {rows} rows of x and {out_f} outputs: expected [{rows}, r], [{out_f}, r]"),
            )),
        }
    }
}

/// A [`LoraUp`] as the GEMV kernels read it: U's storage from the view's first element with rows `ldu` apart, B
/// whole, both in x's dtype.
struct DeviceLora {
    u: Tensor,
    u_offset: usize,
    ldu: usize,
    b: Tensor,
    alpha: f64,
}

impl Nf4Weight {
    /// x·Wᵀ for x: [rows, in] with at most [`GEMV_MAX_ROWS`] rows (a decoding step's), reading W packed: on a GPU the
    /// NF4 GEMV (the weight never exists dense), on the CPU its reference, the exact dot products of x with the
    /// dequantized rows rounded once. In x's dtype (f32 or bf16; f32 on the CPU). With `lora`, an adapter's
    /// up-projection alpha·U·Bᵀ is added before that one rounding, in the same launch.
    pub fn gemv(&self, x: &Tensor, lora: Option<LoraUp<'_>>) -> Result<Tensor> {
        Ok(Nf4Weight::gemv_group(&[(self, lora)], x)?.remove(0))
    }

    /// [`Nf4Weight::gemv`] of each (weight, LoRA up-projection) of `members`, all against the same x (a projection
    /// group: q/k/v, gate/up): on a GPU one launch for up to three weights of one block size and kind of scales, so
    /// that the small ones (k/v_proj) share the large one's wave and launch.
    pub fn gemv_group(members: &[(&Nf4Weight, Option<LoraUp<'_>>)], x: &Tensor) -> Result<Vec<Tensor>> {
        const OP: &str = "nf4 gemv";
        let Some(&(first, _)) = members.first() else { return Ok(Vec::new()) };
        let in_f = first.shape[1];
        let rows = match *x.shape() {
            [rows, i] if i == in_f && (1..=GEMV_MAX_ROWS).contains(&rows) => rows,
            _ => {
                let want = format!("[1..={GEMV_MAX_ROWS}, {in_f}]");
                return Err(Error::shape(
                    OP,
                    format!("x {:?} for a weight {:?}: expected {want}", x.shape(), first.shape),
                ));
            }
        };
        let mut ranks = Vec::with_capacity(members.len());
        for &(w, lora) in members {
            if w.shape[1] != in_f {
                return Err(Error::shape(OP, format!("weights {:?} and {:?} in one group", first.shape, w.shape)));
            }
            ranks.push(lora.map(|l| l.check(rows, w.shape[0])).transpose()?.unwrap_or(0));
        }
        let device = first.device();
        if first.device.is_none() {
            if let Some(&(w, _)) = members.iter().find(|(w, _)| w.device.is_some()) {
                return Err(Error::DeviceMismatch { op: OP, a: device, b: w.device() });
            }
            return members.iter().zip(&ranks).map(|(&(w, lora), &rank)| w.gemv_cpu(x, lora, rows, rank)).collect();
        }
        for &(w, lora) in members {
            let operands = [Some(x), lora.map(|l| l.u), lora.map(|l| l.b)];
            if let Some(t) = operands.into_iter().flatten().find(|t| t.device() != device) {
                return Err(Error::DeviceMismatch { op: OP, a: device, b: t.device() });
            }
            if w.device.is_none() || w.device() != device {
                return Err(Error::DeviceMismatch { op: OP, a: device, b: w.device() });
            }
        }
        let dtype = x.dtype();
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::DType { op: OP, expected: DType::BF16, got: dtype });
        }
        let x = crate::cuda::contiguous(x)?;
        // U as the kernel reads it: its storage from the view's first element, rows `ldu` apart (a group's column
        // block of U is read in place); B whole, in x's dtype.
        let mut loras = Vec::with_capacity(members.len());
        for (&(_, lora), &rank) in members.iter().zip(&ranks) {
            loras.push(match lora {
                Some(l) => {
                    let u = if l.u.dtype() == dtype { l.u.clone() } else { crate::cuda::to_dtype(l.u, dtype)? };
                    let (u, offset, ldu) = match rows_in_place(&u) {
                        Some((offset, ldu)) => (u, offset, ldu),
                        None => (crate::cuda::contiguous(&u)?, 0, rank),
                    };
                    Some(DeviceLora { u, u_offset: offset, ldu, b: crate::cuda::to_dtype(l.b, dtype)?, alpha: l.alpha })
                }
                None => None,
            });
        }
        let Device::Cuda(ordinal) = device else { unreachable!("a weight with a device copy is on a GPU") };
        let dev = cuda_device(ordinal)?;
        fn go<T: CudaElement + qlora_kernels::cuda::GpuFloat>(
            dev: &qlora_kernels::cuda::CudaDevice,
            members: &[(&Nf4Weight, Option<LoraUp<'_>>)],
            loras: &[Option<DeviceLora>],
            x: &Tensor,
            rows: usize,
        ) -> Result<Vec<Tensor>> {
            let mut ys = members
                .iter()
                .map(|(w, _)| dev.alloc::<T>(rows * w.shape[0]).map_err(Error::cuda(OP)))
                .collect::<Result<Vec<_>>>()?;
            // One kernels call per run of weights with one block size (the launch's log2_blocksize).
            let mut at = 0;
            while at < members.len() {
                let blocksize = members[at].0.blocksize;
                let end = at + members[at..].iter().take_while(|(w, _)| w.blocksize == blocksize).count();
                let mut weights: Vec<gnf4::GemvWeight<'_, T>> = members[at..end]
                    .iter()
                    .zip(&loras[at..end])
                    .zip(ys[at..end].iter_mut())
                    .map(|(((w, _), lora), y)| {
                        let d = w.device.as_ref().expect("checked: on the device");
                        gnf4::GemvWeight {
                            packed: buf(&d.packed),
                            scales: d.scales(),
                            lora: lora.as_ref().map(|l| gnf4::GemvLora {
                                u: buf::<T>(&l.u),
                                u_offset: l.u_offset,
                                ldu: l.ldu,
                                b: buf::<T>(&l.b),
                                rank: l.b.shape()[1],
                                alpha: l.alpha as f32,
                            }),
                            y,
                        }
                    })
                    .collect();
                gnf4::nf4_gemv(&mut weights, blocksize, buf::<T>(x), members[0].0.shape[1]).map_err(Error::cuda(OP))?;
                at = end;
            }
            Ok(ys.into_iter().zip(members).map(|(y, (w, _))| output(y, &[rows, w.shape[0]])).collect())
        }
        match dtype {
            DType::F32 => go::<f32>(&dev, members, &loras, &x, rows),
            _ => go::<bf16>(&dev, members, &loras, &x, rows),
        }
    }

    /// [`Nf4Weight::gemv`] on the host (LoRA of `rank`, checked): the reference.
    fn gemv_cpu(&self, x: &Tensor, lora: Option<LoraUp<'_>>, rows: usize, rank: usize) -> Result<Tensor> {
        let [out_f, in_f] = self.shape;
        let (u, b) = match lora {
            Some(l) => (l.u.to_vec::<f32>(), l.b.to_vec::<f32>()),
            None => (Vec::new(), Vec::new()),
        };
        let cpu_lora = lora.map(|l| nf4::GemvLora { u: &u, ldu: rank, b: &b, rank, alpha: l.alpha as f32 });
        let mut y = vec![0f32; rows * out_f];
        let (packed, absmax, bs) = (&self.packed, self.absmax.resolve(), self.blocksize);
        nf4::nf4_gemv(packed, &absmax, bs, &x.to_vec::<f32>(), in_f, cpu_lora, &mut y);
        Tensor::from_vec(y, &[rows, out_f])
    }
}
