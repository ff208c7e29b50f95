//! Matrix products.

use super::{compute_dtype, tensor, Compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{backward_fn, bytes_of, first_grad, keep_if, saved, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::matmul::matmul as gpu_gemm;
use qlora_kernels::matmul::{matmul as gemm, Gemm};
use std::borrow::Cow;

/// How GEMM reads an operand's matrices in place: stored transposed or not, the step between stored rows (the
/// leading dimension, ≥ the row length: a column block of a wider matrix reads in place) and between batch entries.
#[derive(Clone, Copy, Debug)]
struct Reading {
    trans: bool,
    ld: usize,
    batch_stride: usize,
}

/// (rows, cols) of `t`'s last two dimensions.
fn matrix_dims(t: &Tensor) -> (usize, usize) {
    let rank = t.rank();
    (t.shape()[rank - 2], t.shape()[rank - 1])
}

impl Reading {
    /// How GEMM reads a contiguous copy of `t`: packed rows, one matrix per batch entry (0 when one matrix serves
    /// every entry).
    fn packed(t: &Tensor, batch: usize) -> Reading {
        let (rows, cols) = matrix_dims(t);
        let matrix = rows * cols;
        Reading { trans: false, ld: cols, batch_stride: if batch > 1 && t.elem_count() == matrix { 0 } else { matrix } }
    }

    /// How GEMM can read `t` ([batch..., rows, cols]) in place from `available` elements past its offset: rows (or,
    /// transposed, columns) one fixed stride apart and no shorter than it, batch entries one stride apart; None when
    /// it must be copied. Contiguous tensors, transposes of their last two dims (what `x.matmul(&w.t())` produces)
    /// and column blocks of either qualify.
    fn in_place(t: &Tensor, batch: usize, available: usize) -> Option<Reading> {
        let rank = t.rank();
        let (rows, cols) = matrix_dims(t);
        let strides = t.layout().strides();
        let (sr, sc) = (strides[rank - 2], strides[rank - 1]);
        let (trans, ld) = if sc == 1 && (rows == 1 || sr >= cols) {
            (false, if rows == 1 { cols } else { sr })
        } else if sr == 1 && (cols == 1 || sc >= rows) {
            (true, if cols == 1 { rows } else { sc })
        } else {
            return None;
        };
        let batch_stride = if batch > 1 && t.elem_count() == rows * cols {
            0
        } else {
            // Leading dims must step by one stride per batch entry for GEMM's single batch stride to describe them.
            let (mut stride, mut inner) = (None, 1);
            for d in (0..rank - 2).rev().filter(|&d| t.shape()[d] > 1) {
                match stride {
                    None => stride = Some(strides[d]),
                    Some(s) if strides[d] == s * inner => {}
                    Some(_) => return None,
                }
                inner *= t.shape()[d];
            }
            stride.unwrap_or(rows * cols)
        };
        let r = Reading { trans, ld, batch_stride };
        (available >= r.extent(t, batch)).then_some(r)
    }

    /// Elements GEMM reads from the operand's first element.
    fn extent(&self, t: &Tensor, batch: usize) -> usize {
        let (rows, cols) = matrix_dims(t);
        let (stored_rows, stored_cols) = if self.trans { (cols, rows) } else { (rows, cols) };
        if stored_rows * stored_cols == 0 {
            0
        } else {
            (batch.max(1) - 1) * self.batch_stride + (stored_rows - 1) * self.ld + stored_cols
        }
    }
}

/// One operand as the CPU GEMM reads it: its elements from the first one on, and how.
struct Operand<'a, T: Clone> {
    data: Cow<'a, [T]>,
    reading: Reading,
}

/// Reads `t` without copying when [`Reading::in_place`] allows; copies otherwise.
fn operand<T: Compute>(t: &Tensor, batch: usize) -> Operand<'_, T> {
    if let Some(raw) = t.raw::<T>() {
        if let Some(reading) = Reading::in_place(t, batch, raw.len()) {
            return Operand { data: Cow::Borrowed(&raw[..reading.extent(t, batch)]), reading };
        }
    }
    Operand { data: t.values::<T>(), reading: Reading::packed(t, batch) }
}

/// A CUDA operand: `t` itself when GEMM can read it in place (same dtype), else a contiguous copy in the op's
/// precision. → (tensor holding the buffer, how to read it, element offset of its first element in the buffer).
fn gpu_operand(g: &Gpu, t: &Tensor, batch: usize) -> Result<(Tensor, Reading, usize)> {
    if t.dtype() == g.dtype {
        if let crate::tensor::Storage::Cuda(s) = t.storage() {
            let offset = t.layout().offset();
            if let Some(reading) = Reading::in_place(t, batch, s.len().saturating_sub(offset)) {
                return Ok((t.clone(), reading, offset));
            }
        }
    }
    Ok((g.input(t)?, Reading::packed(t, batch), 0))
}

/// Where a 2-D CUDA tensor's rows lie in its storage when a kernel can read them in place, as GEMM reads an operand
/// ([`Reading::in_place`], not transposed): (element offset of the first row, row stride); None when it must be
/// copied. A column block of a wider matrix (a LoRA group's U) qualifies.
pub(crate) fn rows_in_place(t: &Tensor) -> Option<(usize, usize)> {
    let crate::tensor::Storage::Cuda(s) = t.storage() else { return None };
    let offset = t.layout().offset();
    Reading::in_place(t, 1, s.len().saturating_sub(offset)).filter(|r| !r.trans).map(|r| (offset, r.ld))
}

/// One product's dimensions.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl Dims {
    /// The GEMM of a product read as `a` and `b` (at these buffer offsets), writing C's columns `col..col + n` of an
    /// output whose rows are `width` long.
    fn gemm(&self, (a, offset_a): (Reading, usize), (b, offset_b): (Reading, usize), col: usize, width: usize) -> Gemm {
        let Dims { batch, m, n, k } = *self;
        Gemm {
            batch,
            m,
            n,
            k,
            trans_a: a.trans,
            trans_b: b.trans,
            stride_a: a.batch_stride,
            stride_b: b.batch_stride,
            stride_c: m * width,
            ld_a: Some(a.ld),
            ld_b: Some(b.ld),
            ld_c: Some(width),
            offset_a,
            offset_b,
            offset_c: col,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

/// The product's dimensions and output shape [batch..., m, n].
fn product_dims(op: &'static str, a: &Tensor, b: &Tensor) -> Result<(Dims, Vec<usize>)> {
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
    Ok((Dims { batch, m, n, k }, out_shape))
}

/// a: [batch..., m, k] · b: [batch..., k, n] (or b: [k, n] shared by every batch entry) → [batch..., m, n].
/// Transposed views and column blocks are read in place (no copy).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_scaled(a, b, 1.0)
}

/// alpha·a·b, with the shapes of [`matmul`]: the scaling rides on the GEMM instead of a pass of its own.
pub fn matmul_scaled(a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    matmul_concat("matmul", &[(a, b, alpha)])
}

/// [α₀·a₀·b₀, α₁·a₁·b₁, …] side by side along the last dimension: aᵢ: [batch..., m, kᵢ] · bᵢ: [batch..., kᵢ, nᵢ] →
/// [batch..., m, Σ nᵢ], each product written by its GEMM straight into its columns of the one output (no temporary
/// per product, no concatenating pass). Every aᵢ has the same batch dims and m. Precision as [`matmul`]'s, over all
/// operands.
pub fn matmul_columns(products: &[(&Tensor, &Tensor, f64)]) -> Result<Tensor> {
    matmul_concat("matmul_columns", products)
}

fn matmul_concat(op: &'static str, products: &[(&Tensor, &Tensor, f64)]) -> Result<Tensor> {
    let Some(&(a0, b0, _)) = products.first() else {
        return Err(Error::invalid(op, "no products"));
    };
    let (first, mut out_shape) = product_dims(op, a0, b0)?;
    let mut dims = Vec::with_capacity(products.len());
    for &(a, b, _) in products {
        let (d, shape) = product_dims(op, a, b)?;
        if shape[..shape.len() - 1] != out_shape[..out_shape.len() - 1] {
            return Err(Error::shape(
                op,
                format!("{:?} · {:?} beside {:?} · {:?}", a.shape(), b.shape(), a0.shape(), b0.shape()),
            ));
        }
        dims.push(d);
    }
    let width: usize = dims.iter().map(|d| d.n).sum();
    *out_shape.last_mut().expect("rank ≥ 2") = width;
    let Dims { batch, m, .. } = first;
    // Each product with the first of its columns.
    let placed: Vec<(Dims, usize)> = dims
        .into_iter()
        .scan(0, |col, d| {
            *col += d.n;
            Some((d, *col - d.n))
        })
        .collect();
    let operands: Vec<&Tensor> = products.iter().flat_map(|&(a, b, _)| [a, b]).collect();
    if let Some(g) = Gpu::of(op, &operands)? {
        let mut gemms = Vec::with_capacity(products.len());
        for (&(a, b, alpha), &(d, col)) in products.iter().zip(&placed) {
            let (ta, ra, oa) = gpu_operand(&g, a, batch)?;
            let (tb, rb, ob) = gpu_operand(&g, b, batch)?;
            gemms.push((Gemm { alpha, ..d.gemm((ra, oa), (rb, ob), col, width) }, ta, tb));
        }
        return with_gpu!(g, |T| {
            let mut c = g.alloc::<T>(batch * m * width)?;
            if batch * m * width > 0 {
                for (gm, ta, tb) in &gemms {
                    g.run(gpu_gemm(gm, buf::<T>(ta), buf(tb), &mut c))?;
                }
            }
            Ok(output(c, &out_shape))
        });
    }
    fn cpu<T: Compute>(products: &[(&Tensor, &Tensor, f64)], placed: &[(Dims, usize)], shape: &[usize]) -> Tensor {
        let (Dims { batch, m, .. }, width) = (placed[0].0, shape[shape.len() - 1]);
        let mut c = vec![T::default(); batch * m * width];
        for (&(a, b, alpha), &(d, col)) in products.iter().zip(placed) {
            let (oa, ob) = (operand::<T>(a, batch), operand::<T>(b, batch));
            let g = Gemm { alpha, ..d.gemm((oa.reading, 0), (ob.reading, 0), col, width) };
            if batch > 0 {
                gemm(&g, &oa.data, &ob.data, &mut c);
            }
        }
        tensor(c, shape)
    }
    Ok(match compute_dtype(op, &operands)? {
        DType::F64 => cpu::<f64>(products, &placed, &out_shape),
        _ => cpu::<f32>(products, &placed, &out_shape),
    })
}

/// c ← alpha·a·b + beta·c in place, with the shapes of [`matmul`] and c: [batch..., m, n]: beta = 1 accumulates into
/// c (a LoRA branch adding into the base output, with its scaling as alpha), beta = 0 never reads c (NaN in it does
/// not leak). Copy-on-write holds: tensors sharing c's storage keep their values. The product runs in c's dtype: on
/// CUDA (f32 or bf16) the operands are cast to it, bf16 products accumulating in f32; on the CPU in f32 (f64 when any
/// tensor is f64), rounded once into c.
pub fn matmul_into(c: &mut Tensor, a: &Tensor, b: &Tensor, alpha: f64, beta: f64) -> Result<()> {
    const OP: &str = "matmul_into";
    let (d, out_shape) = product_dims(OP, a, b)?;
    if c.shape() != out_shape {
        return Err(Error::shape(
            OP,
            format!("c is {:?}, {:?} · {:?} is {out_shape:?}", c.shape(), a.shape(), b.shape()),
        ));
    }
    let Dims { batch, m, n, .. } = d;
    if let Some(mut g) = Gpu::of(OP, &[a, b, &*c])? {
        g.dtype = c.dtype();
        let (ta, ra, oa) = gpu_operand(&g, a, batch)?;
        let (tb, rb, ob) = gpu_operand(&g, b, batch)?;
        let gm = Gemm { alpha, beta, ..d.gemm((ra, oa), (rb, ob), 0, n) };
        return with_gpu!(g, |T| {
            let out = buffer_mut::<T>(OP, c)?;
            if batch * m * n > 0 {
                g.run(gpu_gemm(&gm, buf::<T>(&ta), buf(&tb), out))?;
            }
            Ok(())
        });
    }
    fn cpu<T: Compute>(c: &mut Tensor, a: &Tensor, b: &Tensor, d: Dims, ab: (f64, f64), shape: &[usize]) -> Result<()> {
        let (oa, ob) = (operand::<T>(a, d.batch), operand::<T>(b, d.batch));
        let g = Gemm { alpha: ab.0, beta: ab.1, ..d.gemm((oa.reading, 0), (ob.reading, 0), 0, d.n) };
        let run = |out: &mut [T]| {
            if d.batch > 0 {
                gemm(&g, &oa.data, &ob.data, out);
            }
        };
        if c.dtype() == T::DTYPE {
            return c.update::<T>(run);
        }
        let mut out = if ab.1 == 0.0 { vec![T::default(); c.elem_count()] } else { c.to_vec::<T>() };
        run(&mut out);
        *c = tensor(out, shape).to_dtype(c.dtype());
        Ok(())
    }
    match compute_dtype(OP, &[a, b, &*c])? {
        DType::F64 => cpu::<f64>(c, a, b, d, (alpha, beta), &out_shape),
        _ => cpu::<f32>(c, a, b, d, (alpha, beta), &out_shape),
    }
}

/// Flattens all leading dimensions: [..., n] → [rows, n].
fn rows2(t: &Tensor) -> Result<Tensor> {
    let n = *t.shape().last().ok_or_else(|| Error::shape("linear", "scalar operand"))?;
    t.reshape(&[t.elem_count() / n.max(1), n])
}

/// [`matmul`] for a tape; `needs` marks which operands want a gradient. Each gradient needs the other operand, kept
/// only when that gradient is wanted.
pub fn matmul_op(a: &Tensor, b: &Tensor, needs: [bool; 2]) -> Result<Recorded> {
    let c = matmul(a, b)?;
    let k = a.shape().last().copied().unwrap_or(1);
    let (a, b) = (keep_if(needs[1], a), keep_if(needs[0] || needs[1], b));
    let grad = backward_fn("matmul", bytes_of([&a, &b]), move |g| {
        let dc = first_grad(g)?;
        let da = if needs[0] { Some(matmul(dc, &saved(&b)?.t()?)?) } else { None };
        let db = if needs[1] {
            let (a, b) = (saved(&a)?, saved(&b)?);
            if b.rank() == 2 && a.rank() > 2 {
                // b was shared across the batch: its gradient sums over every batch entry.
                let a2 = a.reshape(&[a.elem_count() / k, k])?;
                Some(matmul(&a2.t()?, &rows2(dc)?)?)
            } else {
                Some(matmul(&a.t()?, dc)?)
            }
        } else {
            None
        };
        Ok(vec![da, db])
    });
    Ok((c, grad))
}

/// y = x·wᵀ + bias, the Hugging Face `nn.Linear` layout. x: [..., in], w: [out, in], bias: \[out\] → [..., out].
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

/// [`linear`] for a tape; `needs` marks x, w and bias. x is kept for dw, w for dx, each only when that gradient is
/// wanted.
pub fn linear_op(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, needs: [bool; 3]) -> Result<Recorded> {
    let y = linear(x, w, bias)?;
    let (x, w) = (keep_if(needs[1], x), keep_if(needs[0], w));
    let grad = backward_fn("linear", bytes_of([&x, &w]), move |g| {
        let dy = first_grad(g)?;
        let dy2 = rows2(dy)?;
        let dx = if needs[0] {
            let w = saved(&w)?;
            let mut shape = dy.shape().to_vec();
            *shape.last_mut().expect("rank ≥ 1") = w.shape()[1];
            Some(matmul(&dy2, w)?.reshape(&shape)?)
        } else {
            None
        };
        let dw = if needs[1] { Some(matmul(&dy2.t()?, &rows2(saved(&x)?)?)?) } else { None };
        let db = if needs[2] { Some(super::reduce::sum_rows(dy)?) } else { None };
        Ok(vec![dx, dw, db])
    });
    Ok((y, grad))
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

    /// Contiguous [batch, m, k] · [batch or 1, k, n] values, in f64.
    fn batched(a: &[f64], b: &[f64], batch: usize, m: usize, k: usize, n: usize) -> Vec<f64> {
        let shared = b.len() == k * n;
        (0..batch)
            .flat_map(|i| {
                let bi = if shared { b } else { &b[i * k * n..(i + 1) * k * n] };
                naive(&a[i * m * k..(i + 1) * m * k], bi, m, k, n)
            })
            .collect()
    }

    /// A batch of two [m, k] inputs and an [n, k] weight, standard normal f64.
    fn inputs_and_weight(rng: &mut Rng, (m, k, n): (usize, usize, usize)) -> (Tensor, Tensor) {
        (Tensor::randn(&[2, m, k], 1.0, DType::F64, rng), Tensor::randn(&[n, k], 1.0, DType::F64, rng))
    }

    #[test]
    fn transposed_views_and_batches_match_naive() {
        let mut rng = Rng::new(5);
        let (m, k, n) = (3, 5, 7);
        let (a, w) = inputs_and_weight(&mut rng, (m, k, n));
        let out = matmul(&a, &w.t().unwrap()).unwrap();
        assert_eq!(out.shape(), &[2, m, n]);
        let expect = batched(&a.to_vec::<f64>(), &w.t().unwrap().to_vec::<f64>(), 2, m, k, n);
        assert_close("x·wᵀ", &out.to_vec::<f64>(), &expect, Tolerance::F32);
        // A transposed batched left operand and a narrowed (non-packed) right operand.
        let at = Tensor::randn(&[2, k, m], 1.0, DType::F64, &mut rng).transpose(1, 2).unwrap();
        let wide = Tensor::randn(&[k, n + 2], 1.0, DType::F64, &mut rng);
        let b = wide.narrow(1, 1, n).unwrap();
        let got = matmul(&at, &b).unwrap().to_vec::<f64>();
        let expect = batched(&at.contiguous().to_vec::<f64>(), &b.contiguous().to_vec::<f64>(), 2, m, k, n);
        assert_close("aᵀ·narrow(b)", &got, &expect, Tolerance::F32);
        assert!(matmul(&a, &w).is_err());
    }

    /// Column blocks of wider tensors (narrowed last dim), plain and transposed, batched, are read in place and give
    /// their contiguous copies' products (to rounding: the gemm crate picks its kernels by the operands' strides).
    #[test]
    fn column_blocks_are_read_in_place() {
        let mut rng = Rng::new(8);
        let (m, k, n) = (9, 6, 5);
        let wide_a = Tensor::randn(&[2, m, k + 7], 1.0, DType::F32, &mut rng);
        let a = wide_a.narrow(2, 3, k).unwrap();
        let wide_b = Tensor::randn(&[n + 4, k], 1.0, DType::F32, &mut rng).t().unwrap();
        let bt = Tensor::randn(&[k, n + 4], 1.0, DType::F32, &mut rng).narrow(1, 2, n).unwrap();
        let b = wide_b.narrow(1, 1, n).unwrap();
        assert!(Reading::in_place(&a, 2, usize::MAX).is_some_and(|r| !r.trans && r.ld == k + 7));
        assert!(Reading::in_place(&b, 2, usize::MAX).is_some_and(|r| r.trans && r.ld == k));
        for b in [&b, &bt] {
            let got = matmul(&a, b).unwrap().to_vec::<f64>();
            let want = matmul(&a.contiguous(), &b.contiguous()).unwrap().to_vec::<f64>();
            assert_close("column blocks", &got, &want, Tolerance::F32);
        }
        // A batch of column blocks: one batch stride (the wide matrix) between entries.
        let wide = Tensor::randn(&[3, 4, m, k + 2], 1.0, DType::F32, &mut rng);
        let blocks = wide.narrow(3, 1, k).unwrap();
        let r = Reading::in_place(&blocks, 12, usize::MAX).unwrap();
        assert_eq!((r.trans, r.ld, r.batch_stride), (false, k + 2, m * (k + 2)));
        let w = Tensor::randn(&[k, n], 1.0, DType::F32, &mut rng);
        let got = matmul(&blocks, &w).unwrap().to_vec::<f64>();
        assert_close(
            "batched blocks",
            &got,
            &matmul(&blocks.contiguous(), &w).unwrap().to_vec::<f64>(),
            Tolerance::F32,
        );
        // Batch dims that do not step by one stride (a narrowed batch dim) are copied.
        assert!(Reading::in_place(&wide.narrow(1, 0, 3).unwrap(), 9, usize::MAX).is_none());
    }

    /// matmul_columns writes each product into its columns with the bits of the product alone, scaled by its alpha
    /// as matmul_scaled scales it; mismatched rows are refused.
    #[test]
    fn matmul_columns_places_scaled_products_side_by_side() {
        let mut rng = Rng::new(9);
        let rows = 11;
        let dy: Vec<Tensor> = [7, 3, 5].iter().map(|&o| Tensor::randn(&[rows, o], 1.0, DType::F32, &mut rng)).collect();
        let bs: Vec<Tensor> =
            [(7, 4), (3, 1), (5, 6)].iter().map(|&(o, r)| Tensor::randn(&[o, r], 1.0, DType::F32, &mut rng)).collect();
        let alphas = [0.5, -2.0, 1.0];
        let products: Vec<(&Tensor, &Tensor, f64)> =
            dy.iter().zip(&bs).zip(alphas).map(|((a, b), s)| (a, b, s)).collect();
        let cat = matmul_columns(&products).unwrap();
        assert_eq!(cat.shape(), &[rows, 11]);
        let mut col = 0;
        for &(a, b, alpha) in &products {
            let one = matmul_scaled(a, b, alpha).unwrap();
            let n = one.shape()[1];
            assert_eq!(cat.narrow(1, col, n).unwrap().to_vec::<f32>(), one.to_vec::<f32>(), "columns {col}..");
            let plain: Vec<f64> = matmul(a, b).unwrap().to_vec::<f64>().iter().map(|v| alpha * v).collect();
            assert_close("alpha on the GEMM", &one.to_vec::<f64>(), &plain, Tolerance::F32);
            col += n;
        }
        assert_eq!(
            matmul_scaled(&dy[0], &bs[0], 1.0).unwrap().to_vec::<f32>(),
            matmul(&dy[0], &bs[0]).unwrap().to_vec::<f32>()
        );
        let short = Tensor::zeros(&[rows - 1, 3], DType::F32);
        assert!(matmul_columns(&[(&dy[0], &bs[0], 1.0), (&short, &bs[1], 1.0)]).is_err());
        assert!(matmul_columns(&[]).is_err());
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
        batched(a, b, batch, m, k, n)
            .into_iter()
            .zip(c0)
            .map(|(p, &c)| ab.0 * p + if ab.1 == 0.0 { 0.0 } else { ab.1 * c })
            .collect()
    }

    #[test]
    fn matmul_into_scales_accumulates_and_matches_matmul() {
        let mut rng = Rng::new(6);
        let (m, k, n) = (5, 7, 3);
        let (a, w) = inputs_and_weight(&mut rng, (m, k, n));
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
