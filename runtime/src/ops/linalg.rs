//! Matrix products.

use super::{tensor, with_compute, Compute};
use crate::{Error, Result, Tensor};
use qlora_kernels::matmul::{matmul as gemm, Gemm};
use std::borrow::Cow;

/// How one GEMM operand is read: its elements, whether they are stored transposed, and the batch stride.
struct Operand<'a, T: Clone> {
    data: Cow<'a, [T]>,
    trans: bool,
    batch_stride: usize,
}

/// Reads `t` ([batch..., rows, cols]) without copying when it is contiguous or a transpose of its last two dims
/// (what `x.matmul(&w.t())` produces); copies otherwise.
fn operand<T: Compute>(t: &Tensor, batch: usize) -> Operand<'_, T> {
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
    if let Some(raw) = t.raw::<T>() {
        let needed = if t.elem_count() == 0 { 0 } else { (batch.max(1) - 1) * stride + matrix };
        if batch_dims_packed && raw.len() >= needed {
            if sc == 1 && (sr == cols || rows == 1) {
                return Operand { data: Cow::Borrowed(&raw[..needed]), trans: false, batch_stride: stride };
            }
            if sr == 1 && (sc == rows || cols == 1) {
                return Operand { data: Cow::Borrowed(&raw[..needed]), trans: true, batch_stride: stride };
            }
        }
    }
    Operand { data: t.values::<T>(), trans: false, batch_stride: stride }
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
