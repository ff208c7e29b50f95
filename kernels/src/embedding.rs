//! Token embedding lookup and its scatter-add backward.
//!
//! The backward must be bit-reproducible for any thread count, and repeated ids make rows collide. Tokens are
//! therefore grouped by id with a stable counting sort, and each table row is owned by one task that adds its
//! tokens in position order: exactly the order, and so exactly the bits, of the serial loop.

use crate::Float;
use rayon::prelude::*;

/// Elements per rayon task: below this, scheduling costs more than the copying.
const MIN_CHUNK: usize = 1 << 14;

/// table: [vocab, dim], ids: \[n\] → out: [n, dim]. Every id must be in 0..vocab (callers validate user input; assert here).
/// A copy of rows, no arithmetic: any element type (a bf16 table kept on the host gathers in bf16).
pub fn embedding_forward<T: Copy + Send + Sync>(table: &[T], ids: &[i32], dim: usize, out: &mut [T]) {
    let vocab = vocab_of(table.len(), dim);
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: out length vs ids·dim");
    let rows_per_task = MIN_CHUNK.div_ceil(dim);
    out.par_chunks_mut(rows_per_task * dim).zip(ids.par_chunks(rows_per_task)).for_each(|(out, ids)| {
        for (row, &id) in out.chunks_exact_mut(dim).zip(ids) {
            let v = row_of(id, vocab);
            row.copy_from_slice(&table[v * dim..(v + 1) * dim]);
        }
    });
}

/// d_out: [n, dim], ids: \[n\] → d_table: [vocab, dim] += scatter of d_out rows (accumulates; repeated ids add up).
pub fn embedding_backward_accumulate<T: Float>(d_out: &[T], ids: &[i32], dim: usize, d_table: &mut [T]) {
    let vocab = vocab_of(d_table.len(), dim);
    assert_eq!(d_out.len(), ids.len() * dim, "embedding_backward_accumulate: d_out length vs ids·dim");
    // Validate every id before the first write, so a bad id leaves d_table untouched.
    let rows: Vec<usize> = ids.iter().map(|&id| row_of(id, vocab)).collect();
    let add_row = |dst: &mut [T], i: usize| {
        dst.iter_mut().zip(&d_out[i * dim..(i + 1) * dim]).for_each(|(d, &g)| *d = *d + g);
    };
    if d_out.len() < MIN_CHUNK {
        // Same per-row order as the parallel path, without its O(vocab) bookkeeping.
        for (i, &v) in rows.iter().enumerate() {
            add_row(&mut d_table[v * dim..(v + 1) * dim], i);
        }
        return;
    }
    // Counting sort: start[v]..start[v + 1] indexes `order`, which lists row v's token positions ascending.
    let mut start = vec![0usize; vocab + 1];
    for &v in &rows {
        start[v + 1] += 1;
    }
    for v in 0..vocab {
        start[v + 1] += start[v];
    }
    let mut next = start.clone();
    let mut order = vec![0usize; rows.len()];
    for (i, &v) in rows.iter().enumerate() {
        order[next[v]] = i;
        next[v] += 1;
    }
    let rows_per_task = MIN_CHUNK.div_ceil(dim);
    d_table.par_chunks_mut(dim).enumerate().with_min_len(rows_per_task).for_each(|(v, dst)| {
        for &i in &order[start[v]..start[v + 1]] {
            add_row(dst, i);
        }
    });
}

/// The number of table rows, asserting the table is whole rows of a non-empty dimension.
fn vocab_of(table_len: usize, dim: usize) -> usize {
    assert!(dim > 0, "embedding: dim must be positive");
    assert!(table_len % dim == 0, "embedding: table of {table_len} elements is not rows of {dim}");
    table_len / dim
}

fn row_of(id: i32, vocab: usize) -> usize {
    match usize::try_from(id) {
        Ok(v) if v < vocab => v,
        _ => panic!("embedding: id {id} outside 0..{vocab}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{check_gradient, dot, f32s, randn};
    use crate::Rng;

    fn random_ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<i32> {
        (0..n).map(|_| rng.below(vocab as u64) as i32).collect()
    }

    /// The serial definition: add each token's row in position order.
    fn naive_backward(d_out: &[f32], ids: &[i32], dim: usize, d_table: &mut [f32]) {
        for (i, &id) in ids.iter().enumerate() {
            for c in 0..dim {
                d_table[id as usize * dim + c] += d_out[i * dim + c];
            }
        }
    }

    #[test]
    fn forward_copies_rows() {
        let mut rng = Rng::new(1);
        // Small, and large enough for several tasks with a ragged last one.
        for (vocab, dim, n) in [(1, 1, 1), (5, 3, 4), (50, 7, 3 * MIN_CHUNK / 7 + 5), (9, 3000, 20), (4, 2, 0)] {
            let table = f32s(&randn(&mut rng, vocab * dim));
            let ids = random_ids(&mut rng, n, vocab);
            let mut out = vec![f32::NAN; n * dim];
            embedding_forward(&table, &ids, dim, &mut out);
            for (i, &id) in ids.iter().enumerate() {
                assert_eq!(
                    &out[i * dim..(i + 1) * dim],
                    &table[id as usize * dim..(id as usize + 1) * dim],
                    "token {i}"
                );
            }
        }
    }

    #[test]
    fn backward_equals_serial_scatter_bit_for_bit() {
        let mut rng = Rng::new(2);
        // Few ids over many tokens forces heavy repetition; the large cases take the parallel path.
        for (vocab, dim, n) in [(3, 2, 5), (4, 8, 3000), (1000, 33, 2000), (7, 5000, 40)] {
            let d_out = f32s(&randn(&mut rng, n * dim));
            let ids = random_ids(&mut rng, n, vocab);
            let prior = f32s(&randn(&mut rng, vocab * dim));
            let mut want = prior.clone();
            naive_backward(&d_out, &ids, dim, &mut want);
            let mut got = prior.clone();
            embedding_backward_accumulate(&d_out, &ids, dim, &mut got);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "vocab {vocab} dim {dim} n {n}"
            );
        }
    }

    #[test]
    fn repeated_ids_add_up() {
        let d_out = [1.0f64, 10.0, 2.0, 20.0, 4.0, 40.0, 8.0, 80.0];
        let ids = [2, 0, 2, 2];
        let mut d_table = vec![0.5; 3 * 2];
        embedding_backward_accumulate(&d_out, &ids, 2, &mut d_table);
        assert_eq!(d_table, vec![2.5, 20.5, 0.5, 0.5, 13.5, 130.5]);
    }

    #[test]
    fn backward_is_bit_identical_across_thread_counts() {
        let mut rng = Rng::new(3);
        let (vocab, dim, n) = (64, 48, 4000);
        let d_out: Vec<f32> =
            randn(&mut rng, n * dim).iter().enumerate().map(|(i, v)| (v * 10f64.powi((i % 5) as i32)) as f32).collect();
        let ids = random_ids(&mut rng, n, vocab);
        let run = |threads| {
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool").install(|| {
                let mut d_table = vec![0.0f32; vocab * dim];
                embedding_backward_accumulate(&d_out, &ids, dim, &mut d_table);
                d_table.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            })
        };
        let one = run(1);
        for threads in [2, 4] {
            assert_eq!(run(threads), one, "{threads} threads vs 1");
        }
    }

    #[test]
    fn backward_is_the_gradient_of_forward() {
        let mut rng = Rng::new(4);
        let (vocab, dim) = (5, 3);
        let ids = [4, 1, 4, 0, 4, 1];
        let table = randn(&mut rng, vocab * dim);
        let g = randn(&mut rng, ids.len() * dim);
        let mut d_table = vec![0.0; vocab * dim];
        embedding_backward_accumulate(&g, &ids, dim, &mut d_table);
        check_gradient("embedding d_table", &table, &d_table, |t| {
            let mut out = vec![0.0; ids.len() * dim];
            embedding_forward(t, &ids, dim, &mut out);
            dot(&out, &g)
        });
    }

    #[test]
    #[should_panic(expected = "id 5 outside 0..5")]
    fn forward_rejects_id_past_vocab() {
        embedding_forward(&[0.0f32; 10], &[0, 5], 2, &mut [0.0; 4]);
    }

    #[test]
    fn backward_rejects_negative_id_before_writing() {
        let mut d_table = vec![0.0f32; 6];
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            embedding_backward_accumulate(&[1.0f32; 4], &[1, -1], 2, &mut d_table)
        }));
        assert!(caught.is_err());
        assert_eq!(d_table, vec![0.0; 6]);
    }
}
