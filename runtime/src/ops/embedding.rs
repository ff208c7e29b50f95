//! Token embedding: a gather of table rows by id, and its scatter-add backward (for a trainable table).
//!
//! Ids on a GPU are not read back to check them: the kernels mark a row whose id is out of range with NaN (the loss
//! then says so), and the data pipeline checks ids against the vocabulary on the host where it builds a batch.

use super::{indices, rows_cols, tensor, with_compute};
use crate::cuda::{buf, buffer_mut, output, with_gpu, Gpu};
use crate::op::{backward_fn, first_grad, Recorded};
use crate::{DType, Error, Result, Tensor};
use qlora_kernels::cuda::embedding as gemb;
use qlora_kernels::embedding as emb;

fn check_ids(op: &'static str, ids: &[i32], bound: usize) -> Result<()> {
    match ids.iter().find(|&&i| i < 0 || i as usize >= bound) {
        Some(&bad) => Err(Error::Index { op, what: "token id", value: bad as i64, bound }),
        None => Ok(()),
    }
}

/// table: [vocab, dim], ids: [n...] (I32) → [n..., dim].
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (vocab, dim) = rows_cols("embedding", table)?;
    if table.rank() != 2 {
        return Err(Error::shape("embedding", format!("table must be [vocab, dim], got {:?}", table.shape())));
    }
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    if let Some(g) = Gpu::of("embedding", &[table])? {
        return with_gpu!(g, |T| {
            let (table, ids) = (g.input(table)?, g.index("ids", ids)?);
            let mut out = g.alloc::<T>(ids.elem_count() * dim)?;
            g.run(gemb::embedding_forward(buf::<T>(&table), buf(&ids), dim, &mut out))?;
            Ok(output(out, &shape))
        });
    }
    let idv = indices("embedding", "ids", ids)?;
    check_ids("embedding", &idv, vocab)?;
    match table.dtype() {
        // A bf16 or f16 table (a frozen one kept on the host for a GPU model): its rows as they are, in its dtype, as
        // a GPU gathers them; a gather does no arithmetic, and converting the whole table per batch would cost 2 GB
        // of f32 at Llama-3-8B's 128256 × 4096.
        DType::BF16 => Ok(gather::<half::bf16>(table, &idv, dim, &shape)),
        DType::F16 => Ok(gather::<half::f16>(table, &idv, dim, &shape)),
        _ => with_compute!("embedding", [table], |T| Ok(gather::<T>(table, &idv, dim, &shape))),
    }
}

/// Rows `ids` (checked) of `table` read as `T`, shaped `shape`.
fn gather<T: crate::Element + Default>(table: &Tensor, ids: &[i32], dim: usize, shape: &[usize]) -> Tensor {
    let mut out = vec![T::default(); ids.len() * dim];
    emb::embedding_forward(&table.values::<T>(), ids, dim, &mut out);
    tensor(out, shape)
}

/// d_table[ids\[i\]] += d_out\[i\], into `d_table` (dtype kept).
pub fn embedding_backward_accumulate(d_out: &Tensor, ids: &Tensor, d_table: &mut Tensor) -> Result<()> {
    let (vocab, dim) = rows_cols("embedding_backward", d_table)?;
    if d_out.elem_count() != ids.elem_count() * dim {
        return Err(Error::shape(
            "embedding_backward",
            format!("d_out {:?} for {} ids of dim {dim}", d_out.shape(), ids.elem_count()),
        ));
    }
    if let Some(g) = Gpu::of("embedding_backward", &[d_out, &*d_table])? {
        // d_out is cast to the table gradient's dtype, which accumulates in place.
        let (d, ids) = (g.input_as(d_out, d_table.dtype())?, g.index("ids", ids)?);
        return match d_table.dtype() {
            DType::BF16 => g.run(gemb::embedding_backward_accumulate(
                buf(&d),
                buf(&ids),
                dim,
                buffer_mut::<half::bf16>("embedding_backward", d_table)?,
            )),
            _ => g.run(gemb::embedding_backward_accumulate(
                buf(&d),
                buf(&ids),
                dim,
                buffer_mut::<f32>("embedding_backward", d_table)?,
            )),
        };
    }
    let idv = indices("embedding_backward", "ids", ids)?;
    check_ids("embedding_backward", &idv, vocab)?;
    with_compute!("embedding_backward", [d_out, &*d_table], |T| {
        let d = d_out.values::<T>();
        if d_table.dtype() == <T as crate::Element>::DTYPE {
            d_table.update::<T>(|t| emb::embedding_backward_accumulate(&d, &idv, dim, t))
        } else {
            let mut acc = d_table.to_vec::<T>();
            emb::embedding_backward_accumulate(&d, &idv, dim, &mut acc);
            *d_table = tensor(acc, d_table.shape()).to_dtype(d_table.dtype());
            Ok(())
        }
    })
}

/// [`embedding`] for a tape: the rows, and a backward for the table (reading the ids and the table's shape).
pub fn embedding_op(table: &Tensor, ids: &Tensor) -> Result<Recorded> {
    let y = embedding(table, ids)?;
    let (ids, table_shape) = (ids.clone(), table.shape().to_vec());
    let grad = backward_fn("embedding", ids.size_in_bytes(), move |g| {
        let g = first_grad(g)?;
        let mut d_table = Tensor::zeros_on(&table_shape, g.dtype(), g.device())?;
        embedding_backward_accumulate(g, &ids, &mut d_table)?;
        Ok(vec![Some(d_table)])
    });
    Ok((y, grad))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    /// A bf16 or f16 table on the host gathers its rows in its own dtype: the values its f32 conversion gathers.
    #[test]
    fn a_half_table_gathers_its_rows_in_its_dtype() {
        let mut rng = Rng::new(3);
        let ids = Tensor::from_vec(vec![5i32, 0, 36, 5, 17], &[5]).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let table = Tensor::randn(&[37, 24], 1.0, dtype, &mut rng);
            let got = embedding(&table, &ids).unwrap();
            let want = embedding(&table.to_dtype(DType::F32), &ids).unwrap();
            assert_eq!((got.dtype(), got.shape()), (dtype, &[5, 24][..]));
            assert_eq!(got.to_dtype(DType::F32).to_vec::<f32>(), want.to_vec::<f32>(), "{dtype:?}");
        }
        let bad = Tensor::from_vec(vec![37i32], &[1]).unwrap();
        assert!(embedding(&Tensor::randn(&[37, 24], 1.0, DType::BF16, &mut rng), &bad).is_err());
    }
}
