//! Matrix products.

use super::{tensor, with_compute, Compute};
use crate::cuda::{buf, output, with_gpu, Gpu};
use crate::{Error, Result, Tensor};
use qlora_kernels::cuda::matmul::matmul as gpu_gemm;
use qlora_kernels::matmul::{matmul as gemm, Gemm};
use std::borrow::Cow;

/// How one GEMM operand is read: its elements, whether they are stored transposed, and the batch stride.
struct Operand<'a, T: Clone> {
    data: Cow<'a, [T]>,
    trans: bool,
    batch_stride: usize,
}

/// How GEMM can read `t` ([batch..., rows, cols]) in place from `available` elements past its offset: (Some(trans)
/// when it is contiguous or a transpose of its last two dims, what `x.matmul(&w.t())` produces, None when it must
/// be copied; the batch stride, 0 when one matrix is shared by every batch entry).
fn in_place(t: &Tensor, batch: usize, available: usize) -> (Option<bool>, usize) {
    let rank = t.rank();
    let (rows, cols) = (t.shape()[rank - 2], t.shape()[rank - 1]);
    let strides = t.layout().strides();
    let (sr, sc) = (strides[rank - 2], strides[rank - 1]);
    let matrix = rows * cols;
    // Leading dims must step by whole matrices for one batch stride to describe them.
    let mut expect = matrix;
    let batch_dims_packed = (0..rank - 2).rev().all(|d| {
        let ok = t.shape()[d] == 1 || strides[d] == expect;
        expect *= t.shape()[d];
        ok
    });
    let stride = if batch > 1 && t.elem_count() == matrix { 0 } else { matrix };
    if batch_dims_packed && available >= needed(t, batch, stride) {
        if sc == 1 && (sr == cols || rows == 1) {
            return (Some(false), stride);
        }
        if sr == 1 && (sc == rows || cols == 1) {
            return (Some(true), stride);
        }
    }
    (None, stride)
}

/// Elements GEMM reads from an operand's start.
fn needed(t: &Tensor, batch: usize, stride: usize) -> usize {
    let rank = t.rank();
    let matrix = t.shape()[rank - 2] * t.shape()[rank - 1];
    if t.elem_count() == 0 {
        0
    } else {
        (batch.max(1) - 1) * stride + matrix
    }
}

/// Reads `t` without copying when [`in_place`] allows; copies otherwise.
fn operand<T: Compute>(t: &Tensor, batch: usize) -> Operand<'_, T> {
    if let Some(raw) = t.raw::<T>() {
        if let (Some(trans), stride) = in_place(t, batch, raw.len()) {
            let data = Cow::Borrowed(&raw[..needed(t, batch, stride)]);
            return Operand { data, trans, batch_stride: stride };
        }
    }
    let (_, stride) = in_place(t, batch, 0);
    Operand { data: t.values::<T>(), trans: false, batch_stride: stride }
}

/// A CUDA operand: `t` itself when GEMM can read its whole buffer in place (same dtype, offset 0), else a contiguous
/// copy in the op's precision. → (tensor holding the buffer, trans, batch stride).
fn gpu_operand(g: &Gpu, t: &Tensor, batch: usize) -> Result<(Tensor, bool, usize)> {
    if t.dtype() == g.dtype && t.layout().offset() == 0 {
        if let crate::tensor::Storage::Cuda(s) = t.storage() {
            if let (Some(trans), stride) = in_place(t, batch, s.len()) {
                // The buffer is read from its start, so it must hold exactly what GEMM reads or more.
                return Ok((t.clone(), trans, stride));
            }
        }
    }
    let (_, stride) = in_place(t, batch, 0);
    Ok((g.input(t)?, false, stride))
}

/// a: [batch..., m, k] · b: [batch..., k, n] (or b: [k, n] shared by every batch entry) → [batch..., m, n].
/// Transposed views are read in place (no copy).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape("matmul", format!("operands need rank ≥ 2: {:?} · {:?}", a.shape(), b.shape())));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    let batch_shape = &a.shape()[..ra - 2];
    if k != k2 || (rb > 2 && b.shape()[..rb - 2] != *batch_shape) {
        return Err(Error::shape("matmul", format!("{:?} · {:?}", a.shape(), b.shape())));
    }
    let batch: usize = batch_shape.iter().product();
    let mut out_shape = batch_shape.to_vec();
    out_shape.extend([m, n]);
    if let Some(g) = Gpu::of("matmul", &[a, b])? {
        let (ta, trans_a, stride_a) = gpu_operand(&g, a, batch)?;
        let (tb, trans_b, stride_b) = gpu_operand(&g, b, batch)?;
        let gm = Gemm { batch, m, n, k, trans_a, trans_b, stride_a, stride_b, stride_c: m * n, alpha: 1.0, beta: 0.0 };
        return with_gpu!(g, |T| {
            let mut c = g.alloc::<T>(batch * m * n)?;
            if batch * m * n > 0 {
                g.run(gpu_gemm(&gm, buf::<T>(&ta), buf(&tb), &mut c))?;
            }
            Ok(output(c, &out_shape))
        });
    }
    with_compute!("matmul", [a, b], |T| {
        let (oa, ob) = (operand::<T>(a, batch), operand::<T>(b, batch));
        let g = Gemm {
            batch,
            m,
            n,
            k,
            trans_a: oa.trans,
            trans_b: ob.trans,
            stride_a: oa.batch_stride,
            stride_b: ob.batch_stride,
            stride_c: m * n,
            alpha: 1.0,
            beta: 0.0,
        };
        let mut c = vec![T::default(); batch * m * n];
        if batch > 0 {
            gemm(&g, &oa.data, &ob.data, &mut c);
        }
        Ok(tensor(c, &out_shape))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use qlora_kernels::testing::{assert_close, Tolerance};
    use qlora_kernels::Rng;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn transposed_views_and_batches_match_naive() {
        let mut rng = Rng::new(5);
        let (m, k, n) = (3, 5, 7);
        let a = Tensor::randn(&[2, m, k], 1.0, DType::F64, &mut rng);
        let w = Tensor::randn(&[n, k], 1.0, DType::F64, &mut rng);
        let out = matmul(&a, &w.t().unwrap()).unwrap();
        assert_eq!(out.shape(), &[2, m, n]);
        let wt = w.t().unwrap().to_vec::<f64>();
        let av = a.to_vec::<f64>();
        let mut expect = naive(&av[..m * k], &wt, m, k, n);
        expect.extend(naive(&av[m * k..], &wt, m, k, n));
        assert_close("x·wᵀ", &out.to_vec::<f64>(), &expect, Tolerance::F32);
        // A transposed batched left operand and a narrowed (non-packed) right operand.
        let at = Tensor::randn(&[2, k, m], 1.0, DType::F64, &mut rng).transpose(1, 2).unwrap();
        let wide = Tensor::randn(&[k, n + 2], 1.0, DType::F64, &mut rng);
        let b = wide.narrow(1, 1, n).unwrap();
        let got = matmul(&at, &b).unwrap().to_vec::<f64>();
        let (ac, bc) = (at.contiguous().to_vec::<f64>(), b.contiguous().to_vec::<f64>());
        let mut expect = naive(&ac[..m * k], &bc, m, k, n);
        expect.extend(naive(&ac[m * k..], &bc, m, k, n));
        assert_close("aᵀ·narrow(b)", &got, &expect, Tolerance::F32);
        assert!(matmul(&a, &w).is_err());
    }
}
