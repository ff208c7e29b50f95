//! Where a frozen base weight is materialized for one product: NF4 weights are dequantized into one scratch buffer
//! per thread, device and dtype, reused by every projection of every layer (forward, recomputation and backward),
//! instead of a fresh [out, in] tensor per call. The scratch grows to the largest weight seen and stays.

use qlora_runtime::memory::{tagged, Category};
use qlora_runtime::ops::dora::{scale_by, Axis};
use qlora_runtime::ops::linalg::{matmul, matmul_into, matmul_scaled};
use qlora_runtime::quant::{BaseWeight, LoraUp, Nf4Weight, GEMV_MAX_ROWS};
use qlora_runtime::{DType, Device, Result, Tensor};
use std::cell::RefCell;

thread_local! {
    /// One buffer per (device, dtype); a tape runs on one thread, so a thread-local needs no lock.
    static SCRATCH: RefCell<Vec<(Device, DType, Tensor)>> = const { RefCell::new(Vec::new()) };
}

/// x2·Wᵀ for x2: [rows, in] against each frozen base of `bases`, plus LoRA's up-projection alpha·U·Bᵀ where one is
/// given: a decoding step's few rows against NF4 weights on a GPU read them packed (`Nf4Weight::gemv_group`: reading
/// 4 bits per weight is the whole cost of a token; the up-projections ride on the same launches, and a group's
/// weights share them); every other product multiplies by the weight materialized in the scratch ([`with_weight`]),
/// the up-projection and the base product meeting in one output ([`base_plus_up`]).
pub(super) fn base_products(bases: &[(&BaseWeight, Option<LoraUp>)], x2: &Tensor, dtype: DType) -> Result<Vec<Tensor>> {
    let rows = x2.shape()[0];
    let gemv = (1..=GEMV_MAX_ROWS).contains(&rows) && x2.dtype() == dtype && matches!(dtype, DType::F32 | DType::BF16);
    let packed: Option<Vec<_>> = bases
        .iter()
        .map(|(base, lora)| match base {
            BaseWeight::Nf4(w) if gemv && w.device() != Device::Cpu => Some((w, *lora)),
            _ => None,
        })
        .collect();
    if let Some(members) = packed {
        return Nf4Weight::gemv_group(&members, x2);
    }
    bases
        .iter()
        .map(|(base, lora)| match lora {
            Some(l) => with_weight(base, dtype, |w| base_plus_up(x2, w, l.u, l.b, l.alpha)),
            None => with_weight(base, dtype, |w| matmul(x2, &w.t()?)),
        })
        .collect()
}

/// Whether LoRA's thin K = r products go before the base GEMMs that add into the same output: on a GPU the thin
/// product then only writes the output, and the base GEMM adds into it with beta = 1, its read absorbed in the
/// compute-bound GEMM's epilogue (the other order would read and write the whole output again in the thin GEMM). The
/// CPU keeps base-then-thin, so its results stay what they were, bit for bit.
pub(super) fn thin_first(device: Device) -> bool {
    device != Device::Cpu
}

/// x·wᵀ + alpha·u·bᵀ (w [out, in], u [rows, r], b [out, r]): a base product and LoRA's up-projection (or, given
/// transposed operands, dx's base and du·A terms) in one output, in [`thin_first`]'s order.
pub(super) fn base_plus_up(x: &Tensor, w: &Tensor, u: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    if !thin_first(x.device()) {
        let mut y = matmul(x, &w.t()?)?;
        matmul_into(&mut y, u, &b.t()?, alpha, 1.0)?;
        return Ok(y);
    }
    let mut y = matmul_scaled(u, &b.t()?, alpha)?;
    matmul_into(&mut y, x, &w.t()?, 1.0, 1.0)?;
    Ok(y)
}

/// Runs `f` on `base` as an [out, in] tensor in `dtype` (CPU: f32, or f64 for gradient checks; CUDA: the activations'
/// dtype). `f` must not keep the tensor: for NF4 it views the scratch, which the next call overwrites (a kept view
/// would stay correct, copy-on-write, but the next call would then copy the scratch instead of reusing it).
pub(super) fn with_weight<R>(base: &BaseWeight, dtype: DType, f: impl FnOnce(&Tensor) -> Result<R>) -> Result<R> {
    match scratch_weight(base, dtype) {
        Some(w) => in_scratch(w, dtype, |w, scratch| w.dequantize_into(scratch), f),
        None => f(&base.materialize(dtype)?),
    }
}

/// [`with_weight`] of diag(g)·W (g: \[out\]): an NF4 weight of whole-block rows comes out of the dequantization
/// scaled ([`Nf4Weight::dequantize_scaled_into`]: DoRA's m/n at no cost of its own); any other weight is scaled by
/// a pass over it.
pub(super) fn with_scaled_weight<R>(
    base: &BaseWeight,
    dtype: DType,
    g: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<R>,
) -> Result<R> {
    match scratch_weight(base, dtype) {
        Some(w) if w.rows_are_whole_blocks() => {
            in_scratch(w, dtype, |w, scratch| w.dequantize_scaled_into(scratch, g), f)
        }
        _ => f(&scale_by(&base.materialize(dtype)?, g, 0.0, Axis::Rows)?),
    }
}

/// The NF4 weight of `base` when it dequantizes into the scratch in `dtype` (f64 and dense weights do not).
fn scratch_weight(base: &BaseWeight, dtype: DType) -> Option<&Nf4Weight> {
    match base {
        BaseWeight::Nf4(w) if matches!(dtype, DType::F32 | DType::BF16 | DType::F16) => Some(w),
        _ => None,
    }
}

/// `f` on `w` as `fill` writes it into this thread's scratch for (w's device, `dtype`).
fn in_scratch<R>(
    w: &Nf4Weight,
    dtype: DType,
    fill: impl FnOnce(&Nf4Weight, &mut Tensor) -> Result<Tensor>,
    f: impl FnOnce(&Tensor) -> Result<R>,
) -> Result<R> {
    let device = w.device();
    let taken = SCRATCH.with_borrow_mut(|all| {
        let at = all.iter().position(|(d, t, _)| (*d, *t) == (device, dtype))?;
        Some(all.swap_remove(at).2)
    });
    // The first weight, or one larger than any before: a fresh buffer of its size becomes the scratch.
    let mut scratch = match taken.filter(|s| s.elem_count() >= w.elem_count()) {
        Some(scratch) => scratch,
        None => tagged(Category::Scratch, || Tensor::zeros_on(&[w.elem_count()], dtype, device))?,
    };
    let r = fill(w, &mut scratch).and_then(|view| f(&view));
    SCRATCH.with_borrow_mut(|all| all.push((device, dtype, scratch)));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use qlora_runtime::quant::Nf4Weight;
    use qlora_runtime::Rng;

    #[test]
    fn nf4_weights_share_one_scratch_and_keep_their_values() {
        let mut rng = Rng::new(4);
        let small = Nf4Weight::quantize(&Tensor::randn(&[8, 64], 0.1, DType::F32, &mut rng), 64, true).unwrap();
        let big = Nf4Weight::quantize(&Tensor::randn(&[24, 64], 0.1, DType::F32, &mut rng), 64, false).unwrap();
        let (small, big) = (BaseWeight::Nf4(small), BaseWeight::Nf4(big));
        for b in [&small, &big, &small, &big] {
            let got = with_weight(b, DType::F32, |w| Ok(w.to_vec::<f32>())).unwrap();
            assert_eq!(got, b.materialize(DType::F32).unwrap().to_vec::<f32>());
        }
        // The small weight is a view of the one scratch, which has the big weight's size.
        let kept = with_weight(&small, DType::F32, |w| Ok(w.clone())).unwrap();
        SCRATCH.with_borrow(|all| {
            let [(Device::Cpu, DType::F32, scratch)] = &all[..] else { panic!("one scratch, got {}", all.len()) };
            assert_eq!(scratch.elem_count(), 24 * 64);
            assert!(kept.shares_storage(scratch));
        });
        // A view kept past the call keeps its values when the scratch is written again.
        with_weight(&big, DType::F32, |_| Ok(())).unwrap();
        assert_eq!(kept.to_vec::<f32>(), small.materialize(DType::F32).unwrap().to_vec::<f32>());
        // Dense weights and f64 bypass the scratch.
        let dense = BaseWeight::Dense(Tensor::ones(&[2, 3], DType::F32));
        assert_eq!(with_weight(&dense, DType::F32, |w| Ok(w.to_vec::<f32>())).unwrap(), vec![1.0; 6]);
        assert_eq!(with_weight(&small, DType::F64, |w| Ok(w.dtype())).unwrap(), DType::F64);
        assert_eq!(SCRATCH.with_borrow(Vec::len), 1);
    }
}
