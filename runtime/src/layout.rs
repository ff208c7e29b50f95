//! Shape, strides and offset: how a tensor's elements sit in its storage. Views (reshape, transpose, narrow)
//! change only this, never the storage.

use crate::{Error, Result};
use smallvec::SmallVec;

pub type Dims = SmallVec<[usize; 6]>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Dims,
    strides: Dims,
    offset: usize,
}

pub fn contiguous_strides(shape: &[usize]) -> Dims {
    let mut strides: Dims = smallvec::smallvec![0; shape.len()];
    let mut acc = 1;
    for i in (0..shape.len()).rev() {
        strides[i] = acc;
        acc *= shape[i];
    }
    strides
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout { shape: shape.into(), strides: contiguous_strides(shape), offset: 0 }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn strides(&self) -> &[usize] {
        &self.strides
    }

    pub fn offset(&self) -> usize {
        self.offset
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Row-major with no gaps (size-1 dimensions may carry any stride).
    pub fn is_contiguous(&self) -> bool {
        let mut acc = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 && s != acc {
                return false;
            }
            acc *= d;
        }
        true
    }

    pub fn reshape(&self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.elem_count() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} ({} elements) to {shape:?} ({n})", self.shape, self.elem_count()),
            ));
        }
        if !self.is_contiguous() {
            return Err(Error::shape("reshape", "view of a non-contiguous tensor (call contiguous() first)"));
        }
        Ok(Layout { shape: shape.into(), strides: contiguous_strides(shape), offset: self.offset })
    }

    pub fn transpose(&self, a: usize, b: usize) -> Result<Self> {
        let rank = self.shape.len();
        if a >= rank || b >= rank {
            return Err(Error::shape("transpose", format!("dims {a},{b} of a rank-{rank} tensor")));
        }
        let mut l = self.clone();
        l.shape.swap(a, b);
        l.strides.swap(a, b);
        Ok(l)
    }

    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Self> {
        let Some(&size) = self.shape.get(dim) else {
            return Err(Error::shape("narrow", format!("dim {dim} of a rank-{} tensor", self.shape.len())));
        };
        if start.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::shape("narrow", format!("{start}..{start}+{len} of dim {dim} with size {size}")));
        }
        let mut l = self.clone();
        l.offset += start * self.strides[dim];
        l.shape[dim] = len;
        Ok(l)
    }

    /// Storage indices of the elements in row-major order.
    pub fn storage_indices(&self) -> impl Iterator<Item = usize> + '_ {
        let rank = self.shape.len();
        let n = self.elem_count();
        let mut index: Dims = smallvec::smallvec![0; rank];
        let mut pos = self.offset;
        (0..n).map(move |i| {
            let current = pos;
            if i + 1 < n {
                // Odometer increment: carry through trailing dimensions.
                for d in (0..rank).rev() {
                    index[d] += 1;
                    pos += self.strides[d];
                    if index[d] < self.shape[d] {
                        break;
                    }
                    pos -= self.strides[d] * self.shape[d];
                    index[d] = 0;
                }
            }
            current
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposed_and_narrowed_indices() {
        let l = Layout::contiguous(&[2, 3]);
        assert!(l.is_contiguous());
        let t = l.transpose(0, 1).unwrap();
        assert!(!t.is_contiguous());
        assert_eq!(t.storage_indices().collect::<Vec<_>>(), vec![0, 3, 1, 4, 2, 5]);
        let n = l.narrow(1, 1, 2).unwrap();
        assert_eq!(n.storage_indices().collect::<Vec<_>>(), vec![1, 2, 4, 5]);
        assert!(l.narrow(1, 2, 2).is_err());
        assert!(t.reshape(&[6]).is_err());
        assert_eq!(l.reshape(&[3, 2]).unwrap().strides(), &[2, 1]);
        let row = l.narrow(0, 1, 1).unwrap();
        assert!(row.is_contiguous(), "one row of a contiguous matrix is contiguous");
        assert_eq!(row.storage_indices().collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn empty_and_scalar() {
        assert_eq!(Layout::contiguous(&[]).storage_indices().collect::<Vec<_>>(), vec![0]);
        assert_eq!(Layout::contiguous(&[0, 3]).storage_indices().count(), 0);
    }
}
