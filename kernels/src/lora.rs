//! LoRA's delta weight s·B·A in one fixed order of operations, the CPU reference of `kernels/cuda/lora.cu`: what
//! `qlora-rt merge` folds into the base. Each product and each sum is rounded on its own, k = 0, 1, …, r − 1 in
//! turn, then the sum is scaled once. A GEMM would be faster but its order (and whether it fuses multiply-adds)
//! depends on the CPU it runs on and differs on the GPU; this order is the same everywhere, so a merged checkpoint is
//! the same bytes wherever it is computed. The work is r multiply-adds per element, small next to the memory it
//! touches.

use crate::float::Float;
use rayon::prelude::*;

/// Rows per rayon task: enough that a task is worth scheduling at r = 1 and a 4096-wide row.
const MIN_ROWS_PER_TASK: usize = 8;

/// (rows, cols) of the delta of b: [rows, r] and a: [r, cols] into `out_len` elements, asserting the shapes (the CUDA
/// twin's contract too).
pub(crate) fn delta_dims(b_len: usize, a_len: usize, r: usize, out_len: usize) -> (usize, usize) {
    assert!(r > 0 && b_len % r == 0 && a_len % r == 0, "lora delta: b {b_len} and a {a_len} values for r {r}");
    let (rows, cols) = (b_len / r, a_len / r);
    assert_eq!(out_len, rows * cols, "lora delta: out for [{rows}, {cols}]");
    (rows, cols)
}

/// b: [rows, r], a: [r, cols] → out: [rows, cols] = s·(Σ_k b_ik·a_kj), summed from k = 0 with every operation
/// rounded.
pub fn delta<T: Float>(b: &[T], a: &[T], r: usize, s: T, out: &mut [T]) {
    let (_, cols) = delta_dims(b.len(), a.len(), r, out.len());
    if cols == 0 {
        return;
    }
    out.par_chunks_mut(cols).zip(b.par_chunks(r)).with_min_len(MIN_ROWS_PER_TASK).for_each(|(row, b_row)| {
        row.fill(T::zero());
        for (&b_ik, a_k) in b_row.iter().zip(a.chunks_exact(cols)) {
            // Rust never contracts a·b + c into a fused multiply-add: two roundings, as the GPU's __fmul_rn/__fadd_rn.
            for (o, &a_kj) in row.iter_mut().zip(a_k) {
                *o = *o + b_ik * a_kj;
            }
        }
        for o in row.iter_mut() {
            *o = *o * s;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_by_hand_and_in_order() {
        // b: [2, 2], a: [2, 3], s = 0.5.
        let (b, a) = ([1.0f64, 2.0, -1.0, 0.5], [1.0, 0.0, 2.0, 3.0, -1.0, 4.0]);
        let mut out = [0.0; 6];
        delta(&b, &a, 2, 0.5, &mut out);
        assert_eq!(out, [3.5, -1.0, 5.0, 0.25, -0.25, 0.0]);

        // Both rows sum to 1 exactly; summed left to right in f32, 1e8 + 1 rounds to 1e8 in the first and the 1
        // comes last in the second.
        let b = [1e8f32, 1.0, -1e8, 1e8, -1e8, 1.0];
        let a = [1.0f32; 3];
        let mut out = [0.0f32; 2];
        delta(&b, &a, 3, 1.0, &mut out);
        assert_eq!(out, [0.0, 1.0]);
    }
}
