//! Matrix products.

use super::{tensor, with_compute, Compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{bytes_of, first_grad, keep_if, saved, Backward, Recorded};
use crate::{Element, Error, Result, Tensor};
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

/// The product's dimensions: (batch, m, n, k, output shape [batch..., m, n]).
fn product_dims(op: &'static str, a: &Tensor, b: &Tensor) -> Result<(usize, usize, usize, usize, Vec<usize>)> {
    if a.rank() < 2 || b.rank() < 2 {
        return Err(Error::shape(op, format!("operands need rank ≥ 2: {:?} · {:?}", a.shape(), b.shape())));
    }
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.shape()[ra - 2], a.shape()[ra - 1]);
    let (k2, n) = (b.shape()[rb - 2], b.shape()[rb - 1]);
    let batch_shape = &a.shape()[..ra - 2];
    if k != k2 || (rb > 2 && b.shape()[..rb - 2] != *batch_shape) {
        return Err(Error::shape(op, format!("{:?} · {:?}", a.shape(), b.shape())));
    }
    let batch: usize = batch_shape.iter().product();
    let mut out_shape = batch_shape.to_vec();
    out_shape.extend([m, n]);
    Ok((batch, m, n, k, out_shape))
}

/// a: [batch..., m, k] · b: [batch..., k, n] (or b: [k, n] shared by every batch entry) → [batch..., m, n].
/// Transposed views are read in place (no copy).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (batch, m, n, k, out_shape) = product_dims("matmul", a, b)?;
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

/// c ← alpha·a·b + beta·c in place, with the shapes of [`matmul`] and c: [batch..., m, n]: beta = 1 accumulates into
/// c (a LoRA branch adding into the base output, with its scaling as alpha), beta = 0 never reads c (NaN in it does
/// not leak). Copy-on-write holds: tensors sharing c's storage keep their values. The product runs in c's dtype: on
/// CUDA (f32 or bf16) the operands are cast to it, bf16 products accumulating in f32; on the CPU in f32 (f64 when any
/// tensor is f64), rounded once into c.
pub fn matmul_into(c: &mut Tensor, a: &Tensor, b: &Tensor, alpha: f64, beta: f64) -> Result<()> {
    const OP: &str = "matmul_into";
    let (batch, m, n, k, out_shape) = product_dims(OP, a, b)?;
    if c.shape() != out_shape {
        return Err(Error::shape(
            OP,
            format!("c is {:?}, {:?} · {:?} is {out_shape:?}", c.shape(), a.shape(), b.shape()),
        ));
    }
    if let Some(mut g) = Gpu::of(OP, &[a, b, &*c])? {
        g.dtype = c.dtype();
        let (ta, trans_a, stride_a) = gpu_operand(&g, a, batch)?;
        let (tb, trans_b, stride_b) = gpu_operand(&g, b, batch)?;
        let gm = Gemm { batch, m, n, k, trans_a, trans_b, stride_a, stride_b, stride_c: m * n, alpha, beta };
        return with_gpu!(g, |T| {
            let out = buffer_mut::<T>(OP, c)?;
            if batch * m * n > 0 {
                g.run(gpu_gemm(&gm, buf::<T>(&ta), buf(&tb), out))?;
            }
            Ok(())
        });
    }
    with_compute!(OP, [a, b, &*c], |T| {
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
            alpha,
            beta,
        };
        let run = |out: &mut [T]| {
            if batch > 0 {
                gemm(&g, &oa.data, &ob.data, out);
            }
        };
        if c.dtype() == T::DTYPE {
            return c.update::<T>(run);
        }
        let mut out = if beta == 0.0 { vec![T::default(); c.elem_count()] } else { c.to_vec::<T>() };
        run(&mut out);
        *c = tensor(out, &out_shape).to_dtype(c.dtype());
        Ok(())
    })
}

/// Flattens all leading dimensions: [..., n] → [rows, n].
fn rows2(t: &Tensor) -> Result<Tensor> {
    let n = *t.shape().last().ok_or_else(|| Error::shape("linear", "scalar operand"))?;
    t.reshape(&[t.elem_count() / n.max(1), n])
}

/// a·b's backward: each gradient needs the other operand, kept only when that gradient is wanted.
struct MatMulGrad {
    a: Option<Tensor>,
    b: Option<Tensor>,
    a_shape: Vec<usize>,
    needs: [bool; 2],
}

impl Backward for MatMulGrad {
    fn name(&self) -> &'static str {
        "matmul"
    }
    fn saved_bytes(&self) -> usize {
        bytes_of([&self.a, &self.b])
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let dc = first_grad(grads)?;
        let da = if self.needs[0] { Some(matmul(dc, &saved(&self.b)?.t()?)?) } else { None };
        let db = if self.needs[1] {
            let (a, b) = (saved(&self.a)?, saved(&self.b)?);
            if b.rank() == 2 && a.rank() > 2 {
                // b was shared across the batch: its gradient sums over every batch entry.
                let k = self.a_shape[self.a_shape.len() - 1];
                let a2 = a.reshape(&[a.elem_count() / k, k])?;
                Some(matmul(&a2.t()?, &rows2(dc)?)?)
            } else {
                Some(matmul(&a.t()?, dc)?)
            }
        } else {
            None
        };
        Ok(vec![da, db])
    }
}

/// [`matmul`] for a tape; `needs` marks which operands want a gradient.
pub fn matmul_op(a: &Tensor, b: &Tensor, needs: [bool; 2]) -> Result<Recorded> {
    let c = matmul(a, b)?;
    let grad =
        MatMulGrad { a: keep_if(needs[1], a), b: keep_if(needs[0] || needs[1], b), a_shape: a.shape().to_vec(), needs };
    Ok((c, Box::new(grad)))
}

/// y = x·wᵀ + bias, the Hugging Face `nn.Linear` layout. x: [..., in], w: [out, in], bias: [out] → [..., out].
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let [out_f, in_f] = *w.shape() else {
        return Err(Error::shape("linear", format!("weight must be [out, in], got {:?}", w.shape())));
    };
    if x.shape().last() != Some(&in_f) {
        return Err(Error::shape("linear", format!("input {:?} for weight {:?}", x.shape(), w.shape())));
    }
    let mut y = matmul(&rows2(x)?, &w.t()?)?;
    if let Some(b) = bias {
        y = super::elementwise::add_bias(&y, b)?;
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("checked rank ≥ 1") = out_f;
    y.reshape(&shape)
}

/// [`linear`]'s backward: x for dw, w for dx, each kept only when that gradient is wanted.
struct LinearGrad {
    x: Option<Tensor>,
    w: Option<Tensor>,
    needs: [bool; 3],
}

impl Backward for LinearGrad {
    fn name(&self) -> &'static str {
        "linear"
    }
    fn saved_bytes(&self) -> usize {
        bytes_of([&self.x, &self.w])
    }
    fn backward(self: Box<Self>, grads: &[Option<Tensor>]) -> Result<Vec<Option<Tensor>>> {
        let dy = first_grad(grads)?;
        let dy2 = rows2(dy)?;
        let dx = if self.needs[0] {
            let w = saved(&self.w)?;
            let mut shape = dy.shape().to_vec();
            *shape.last_mut().expect("rank ≥ 1") = w.shape()[1];
            Some(matmul(&dy2, w)?.reshape(&shape)?)
        } else {
            None
        };
        let dw = if self.needs[1] { Some(matmul(&dy2.t()?, &rows2(saved(&self.x)?)?)?) } else { None };
        let db = if self.needs[2] { Some(super::reduce::sum_rows(dy)?) } else { None };
        Ok(vec![dx, dw, db])
    }
}

/// [`linear`] for a tape; `needs` marks x, w and bias.
pub fn linear_op(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, needs: [bool; 3]) -> Result<Recorded> {
    let y = linear(x, w, bias)?;
    Ok((y, Box::new(LinearGrad { x: keep_if(needs[1], x), w: keep_if(needs[0], w), needs })))
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

    /// alpha·a·b + beta·c0 in f64 over contiguous [batch, m, k] · [batch or 1, k, n] values.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        a: &[f64],
        b: &[f64],
        c0: &[f64],
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
        ab: (f64, f64),
    ) -> Vec<f64> {
        let shared = b.len() == k * n;
        (0..batch)
            .flat_map(|i| {
                let bi = if shared { b } else { &b[i * k * n..(i + 1) * k * n] };
                naive(&a[i * m * k..(i + 1) * m * k], bi, m, k, n)
            })
            .zip(c0)
            .map(|(p, &c)| ab.0 * p + if ab.1 == 0.0 { 0.0 } else { ab.1 * c })
            .collect()
    }

    #[test]
    fn matmul_into_scales_accumulates_and_matches_matmul() {
        let mut rng = Rng::new(6);
        let (m, k, n) = (5, 7, 3);
        let a = Tensor::randn(&[2, m, k], 1.0, DType::F64, &mut rng);
        let w = Tensor::randn(&[n, k], 1.0, DType::F64, &mut rng);
        let wt = w.t().unwrap();
        let (av, bv) = (a.to_vec::<f64>(), wt.contiguous().to_vec::<f64>());
        for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (-2.0, 0.75), (0.0, 0.5), (0.0, 0.0)] {
            let c0 = Tensor::randn(&[2, m, n], 1.0, DType::F64, &mut rng);
            let (mut c, before) = (c0.clone(), c0.to_vec::<f64>());
            matmul_into(&mut c, &a, &wt, alpha, beta).unwrap();
            let want = reference(&av, &bv, &before, 2, m, k, n, (alpha, beta));
            assert_close(&format!("α {alpha} β {beta}"), &c.to_vec::<f64>(), &want, Tolerance::F32);
            assert_eq!(c0.to_vec::<f64>(), before, "c0, which shared c's storage, keeps its values");
        }
        // beta = 0 never reads c, and gives matmul's bits (f32, shared right operand, transposed view).
        let (a32, w32) = (a.to_dtype(DType::F32), w.to_dtype(DType::F32));
        let mut c = Tensor::full(&[2, m, n], f64::NAN, DType::F32);
        matmul_into(&mut c, &a32, &w32.t().unwrap(), 1.0, 0.0).unwrap();
        assert_eq!(c.to_vec::<f32>(), matmul(&a32, &w32.t().unwrap()).unwrap().to_vec::<f32>());
        // beta = 1 twice adds the product twice.
        let mut acc = Tensor::zeros(&[2, m, n], DType::F32);
        matmul_into(&mut acc, &a32, &w32.t().unwrap(), 1.0, 1.0).unwrap();
        matmul_into(&mut acc, &a32, &w32.t().unwrap(), 1.0, 1.0).unwrap();
        let twice: Vec<f64> = c.to_vec::<f64>().iter().map(|v| 2.0 * v).collect();
        assert_close("β = 1 accumulates", &acc.to_vec::<f64>(), &twice, Tolerance::F32);
    }

    #[test]
    fn matmul_into_rounds_once_into_c_and_keeps_sharers_intact() {
        let mut rng = Rng::new(7);
        let a = Tensor::randn(&[4, 9], 1.0, DType::F32, &mut rng);
        let b = Tensor::randn(&[9, 6], 1.0, DType::F32, &mut rng);
        let c0 = Tensor::randn(&[4, 6], 1.0, DType::BF16, &mut rng);
        let mut c = c0.clone();
        matmul_into(&mut c, &a, &b, 0.25, 1.0).unwrap();
        assert_eq!(c.dtype(), DType::BF16);
        let mut want = c0.to_vec::<f32>();
        qlora_kernels::matmul::matmul(&Gemm::new(4, 6, 9).alpha(0.25).beta(1.0), &a.to_vec(), &b.to_vec(), &mut want);
        let want: Vec<f32> = want.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(c.to_vec::<f32>(), want, "f32 product and accumulation, one rounding to bf16");
        assert_ne!(c0.to_vec::<f32>(), want, "the bf16 tensor c was cloned from keeps its values");

        // c a view: it becomes a whole tensor of its own; the tensor it viewed is untouched.
        let wide = Tensor::zeros(&[4, 8], DType::F32);
        let mut view = wide.narrow(1, 1, 6).unwrap();
        matmul_into(&mut view, &a, &b, 1.0, 1.0).unwrap();
        assert_eq!(view.to_vec::<f32>(), matmul(&a, &b).unwrap().to_vec::<f32>());
        assert!(wide.to_vec::<f32>().iter().all(|&v| v == 0.0));

        let mut wrong = Tensor::zeros(&[4, 5], DType::F32);
        assert!(matmul_into(&mut wrong, &a, &b, 1.0, 0.0).unwrap_err().to_string().contains("c is [4, 5]"));
        assert!(matmul_into(&mut Tensor::zeros(&[4, 6], DType::I32), &a, &b, 1.0, 0.0).is_err());
    }
}
