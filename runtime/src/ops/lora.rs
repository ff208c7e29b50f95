//! LoRA's delta weight as a tensor op: s·B·A in one fixed order of operations (`qlora_kernels::lora`), so that
//! `qlora-rt merge` writes the same bytes on the GPU as on any CPU. Training's adapter products are GEMMs
//! (`linalg`), apart from those through a dropout mask, which a GPU fuses with the mask, and the adapter gradients dU
//! and dB, which a GPU takes from one read of each dy (below). No op here has a gradient: the LoRA group's backward
//! calls them.

use super::dispatch;
use super::elementwise::{accumulate, dropout};
use super::linalg::{matmul, matmul_columns, matmul_scaled, rows_in_place};
use crate::cuda::{buf, buffer_mut, output, Gpu};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::lora as glora;
use qlora_kernels::lora;

/// b: [out, r], a: [r, in] → [out, in] = s·(Σ_k b_ik·a_kj), summed from k = 0 with every operation rounded.
pub fn lora_delta(b: &Tensor, a: &Tensor, s: f64) -> Result<Tensor> {
    let (&[rows, r], &[r_a, cols]) = (b.shape(), a.shape()) else {
        return Err(Error::shape("lora delta", format!("b {:?} and a {:?} must be matrices", b.shape(), a.shape())));
    };
    if r != r_a || r == 0 {
        return Err(Error::shape(
            "lora delta",
            format!("b {:?} · a {:?}: the rank must match and be ≥ 1", b.shape(), a.shape()),
        ));
    }
    dispatch!("lora delta", [b, a] -> &[rows, cols], |T, out|
        gpu: glora::delta(b, a, r, s as f32, &mut out),
        cpu: lora::delta(&b, &a, r, s as T, &mut out),
    )
}

/// dropout(x)·aᵀ: x [rows, cols], a [r, cols] → [rows, r], x's mask that of [`dropout`] with this `p` and `seed`. On a
/// GPU in bf16 with r ≤ 64 one pass over x with the mask drawn in the kernel (no dropped copy of x); elsewhere dropout
/// then the product, which is also the twin the GPU kernel is tested against.
pub fn dropout_matmul_t(x: &Tensor, a: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    const OP: &str = "lora dropout_matmul_t";
    let (rows, r) = dropout_dims(OP, x, a, p)?;
    if let Some(g) = fused(OP, &[x, a], r)? {
        let (x, a) = (g.input(x)?, g.input(a)?);
        let mut u = g.alloc(rows * r)?;
        g.run(glora::dropout_down(buf(&x), buf(&a), r, mask(p, seed), &mut u))?;
        return Ok(output(u, &[rows, r]));
    }
    matmul(&dropout(x, p, seed)?, &a.t()?)
}

/// dx += dropout(du·a) in place: dx [rows, cols] (keeping its dtype), du [rows, r], a [r, cols], the mask that of
/// [`dropout`] over [rows, cols] with this `p` and `seed`. On a GPU in bf16 with r ≤ 64 one pass over dx (no
/// [rows, cols] product, no dropped copy, no separate add); elsewhere those three ops.
pub fn dropout_matmul_accumulate(dx: &mut Tensor, du: &Tensor, a: &Tensor, p: f64, seed: u64) -> Result<()> {
    const OP: &str = "lora dropout_matmul_accumulate";
    let (rows, r) = dropout_dims(OP, dx, a, p)?;
    if du.shape() != [rows, r] {
        return Err(Error::shape(OP, format!("du {:?} for dx {:?} and a {:?}", du.shape(), dx.shape(), a.shape())));
    }
    if let Some(g) = fused(OP, &[&*dx, du, a], r)? {
        let (du, a) = (g.input(du)?, g.input(a)?);
        return g.run(glora::dropout_up_add(buffer_mut(OP, dx)?, buf(&du), buf(&a), r, mask(p, seed)));
    }
    accumulate(dx, 1.0, &dropout(&matmul(du, a)?, p, seed)?)
}

/// The adapter gradients of projections that share an input, from their output gradients: dU = [s₀·dy₀·B₀ | s₁·dy₁·B₁
/// | …] ([rows, Σ rᵢ], as [`matmul_columns`]) and each dBᵢ = sᵢ·dyᵢᵀ·Uᵢ ([outᵢ, rᵢ]), Uᵢ being u's columns in the same
/// order ((dyᵢ, Bᵢ, sᵢ) per projection; dyᵢ [rows, outᵢ], Bᵢ [outᵢ, rᵢ], u [rows, Σ rᵢ]). On a GPU in bf16 at the
/// ranks `qlora_kernels::cuda::lora::grads` takes, one pass over each dy where the two GEMMs read it twice; elsewhere
/// (and as that kernel's twin) the GEMMs, each sum rounded once either way.
pub fn lora_grads(products: &[(&Tensor, &Tensor, f64)], u: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
    const OP: &str = "lora grads";
    let &[rows, u_width] = u.shape() else {
        return Err(Error::shape(OP, format!("u {:?} must be a matrix", u.shape())));
    };
    let mut cols = Vec::with_capacity(products.len());
    let mut width = 0;
    for &(dy, b, _) in products {
        match (dy.shape(), b.shape()) {
            (&[dy_rows, out], &[out_b, r]) if out == out_b && dy_rows == rows => {
                cols.push((width, out, r));
                width += r;
            }
            _ => {
                return Err(Error::shape(OP, format!("dy {:?}, b {:?}, u {:?}", dy.shape(), b.shape(), u.shape())));
            }
        }
    }
    if u_width != width {
        return Err(Error::shape(OP, format!("u {:?} for ranks summing to {width}", u.shape())));
    }
    let operands: Vec<&Tensor> = products.iter().flat_map(|&(dy, b, _)| [dy, b]).chain([u]).collect();
    if let Some(g) = Gpu::of(OP, &operands)?.filter(|_| operands.iter().all(|t| t.dtype() == DType::BF16)) {
        let fits = |u_at: usize, ldu: usize| {
            cols.iter().all(|&(col, out, r)| glora::grads_fit(out, r, [(u_at + col, ldu), (col, width)]))
        };
        if let Some((u_at, ldu)) = rows_in_place(u).filter(|&(at, ld)| fits(at, ld)) {
            let mut du = g.alloc(rows * width)?;
            let mut dbs = Vec::with_capacity(products.len());
            for (&(dy, b, s), &(col, out, r)) in products.iter().zip(&cols) {
                let (dy, b) = (g.input(dy)?, g.input(b)?);
                let mut db = g.alloc(out * r)?;
                let u_rows = glora::Rows { buf: buf(u), offset: u_at + col, ld: ldu };
                let du_rows = glora::Rows { buf: &mut du, offset: col, ld: width };
                g.run(glora::grads(buf(&dy), buf(&b), u_rows, s as f32, du_rows, &mut db, [rows, out, r]))?;
                dbs.push(output(db, &[out, r]));
            }
            return Ok((output(du, &[rows, width]), dbs));
        }
    }
    let du = matmul_columns(products)?;
    let dbs = products
        .iter()
        .zip(&cols)
        .map(|(&(dy, _, s), &(col, _, r))| matmul_scaled(&dy.t()?, &u.narrow(1, col, r)?, s))
        .collect::<Result<Vec<_>>>()?;
    Ok((du, dbs))
}

/// (rows, r) of a [rows, cols] operand and a [r, cols] A, checked, with p in [0, 1).
fn dropout_dims(op: &'static str, t: &Tensor, a: &Tensor, p: f64) -> Result<(usize, usize)> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(op, format!("p must be in [0, 1), got {p}")));
    }
    match (t.shape(), a.shape()) {
        (&[rows, cols], &[r, cols_a]) if cols == cols_a => Ok((rows, r)),
        _ => Err(Error::shape(op, format!("{:?} and a {:?}: [rows, cols] and [r, cols]", t.shape(), a.shape()))),
    }
}

/// The GPU placement of a fused dropout product: every operand bf16 on one GPU and 1 ≤ r ≤ the kernels' largest.
fn fused(op: &'static str, xs: &[&Tensor], r: usize) -> Result<Option<Gpu>> {
    let Some(g) = Gpu::of(op, xs)? else { return Ok(None) };
    let bf16 = xs.iter().all(|t| t.dtype() == DType::BF16);
    Ok((bf16 && (1..=glora::DROPOUT_MAX_R).contains(&r)).then_some(g))
}

/// [`dropout`]'s mask as the GPU kernels take it (kept values times 1/(1 − p) in f32, as `dropout` applies it there).
fn mask(p: f64, seed: u64) -> glora::DropoutMask {
    glora::DropoutMask { p, seed, keep: (1.0 / (1.0 - p)) as f32 }
}
