//! Launchers of `kernels/cuda/embedding.cu`, twins of [`crate::embedding`].
//!
//! The backward is deterministic the CPU's way: token positions are grouped by id with a stable counting sort and
//! each touched table row is summed by one block in position order, so f32 results equal the CPU's bit for bit. The
//! sort runs on the host, which costs one device-to-host copy of the ids (and a stream sync) per call; QLoRA freezes
//! the embedding, so this runs only when it is trained.

use super::source::Module;
use super::{aligned16, config, kernel, launch, same_device, u32_arg, wave_config, DeviceBuffer, GpuFloat, Result};

/// table: [vocab, dim], ids: \[n\] → out: [n, dim]. An id outside 0..vocab (asserted by the CPU kernel) gives a NaN row.
/// Rows of a multiple of 8 elements are copied in 16-byte runs.
pub fn embedding_forward<T: GpuFloat>(
    table: &DeviceBuffer<T>,
    ids: &DeviceBuffer<i32>,
    dim: usize,
    out: &mut DeviceBuffer<T>,
) -> Result<()> {
    let vocab = vocab_of(table.len(), dim);
    assert_eq!(out.len(), ids.len() * dim, "embedding_forward: out length vs ids·dim");
    let dev = same_device("embedding_forward", &[table.device(), ids.device(), out.device()]);
    if out.is_empty() {
        return Ok(());
    }
    let (pt, pi, po, n_dim) = (table.ptr(), ids.ptr(), out.ptr(), out.len() as u64);
    let (dim32, vocab32) = (u32_arg("embedding: dim", dim), u32_arg("embedding: vocab", vocab));
    // Below 2³¹ chunks, so that the kernel's 32-bit grid-stride index cannot wrap.
    let chunks = i32::try_from(out.len() / 8).ok().filter(|_| dim % 8 == 0 && aligned16(&[pt, po])).map(|c| c as u32);
    let Some(chunks) = chunks else {
        let kernel = kernel!("embedding_forward_scalar", T);
        let cfg = wave_config(dev, Module::Embedding, kernel, out.len())?;
        // SAFETY: embedding_forward_scalar_T(const T* table, const int* ids, T* out, u64 n_dim, unsigned dim,
        // unsigned vocab): table holds vocab·dim elements, ids n, out n_dim = n·dim (asserted); the kernel reads
        // table rows only for ids in 0..vocab. All on this device.
        return unsafe { launch!(dev, Module::Embedding, kernel, cfg; pt, pi, po, n_dim, dim32, vocab32) };
    };
    let kernel = kernel!("embedding_forward", T);
    let cfg = wave_config(dev, Module::Embedding, kernel, chunks.div_ceil(4) as usize)?;
    // SAFETY: embedding_forward_T(const T* table, const int* ids, T* out, unsigned chunks, unsigned dim,
    // unsigned vocab), copying `chunks` = n·dim/8 runs of 8 elements: table holds vocab·dim elements, ids n, out
    // n·dim (asserted); dim is a multiple of 8 and table and out 16-byte aligned, so every run is; the kernel reads
    // table rows only for ids in 0..vocab. All on this device.
    unsafe { launch!(dev, Module::Embedding, kernel, cfg; pt, pi, po, chunks, dim32, vocab32) }
}

/// d_out: [n, dim], ids: \[n\] → d_table: [vocab, dim] += scatter of d_out rows (accumulates; repeated ids add up).
/// Panics, before any write, when an id is outside 0..vocab (like the CPU kernel).
pub fn embedding_backward_accumulate<T: GpuFloat>(
    d_out: &DeviceBuffer<T>,
    ids: &DeviceBuffer<i32>,
    dim: usize,
    d_table: &mut DeviceBuffer<T>,
) -> Result<()> {
    let vocab = vocab_of(d_table.len(), dim);
    assert_eq!(d_out.len(), ids.len() * dim, "embedding_backward_accumulate: d_out length vs ids·dim");
    let dev = same_device("embedding_backward_accumulate", &[d_out.device(), ids.device(), d_table.device()]);
    if ids.is_empty() {
        return Ok(());
    }
    let segments = Segments::of(&ids.to_vec()?, vocab);
    let order = dev.upload(&segments.order)?;
    let start = dev.upload(&segments.start)?;
    let row = dev.upload(&segments.row)?;
    let kernel = kernel!("embedding_backward_accumulate", T);
    let (pd, po, ps, pr, pt) = (d_out.ptr(), order.ptr(), start.ptr(), row.ptr(), d_table.ptr());
    let dim32 = u32_arg("embedding: dim", dim);
    // SAFETY: embedding_backward_accumulate_T(const T* d_out, const int* order, const int* seg_start,
    // const int* seg_row, T* d_table, unsigned dim), one block per segment: d_out holds n·dim elements, d_table
    // vocab·dim (asserted); order is a permutation of 0..n, seg_start has segments + 1 ascending entries in 0..=n,
    // seg_row segments ids in 0..vocab (Segments::of). The index buffers return to the pool when dropped,
    // stream-ordered after this kernel. All on this device.
    unsafe {
        launch!(dev, Module::Embedding, kernel, config(u32_arg("embedding: touched rows", segments.row.len())); pd, po, ps, pr, pt, dim32)
    }
}

/// Token positions grouped by id: segment s lists, in `order[start[s]..start[s + 1]]`, the positions (ascending) of
/// the tokens whose id is `row[s]`; only ids that occur have a segment.
#[derive(Debug, PartialEq)]
struct Segments {
    order: Vec<i32>,
    start: Vec<i32>,
    row: Vec<i32>,
}

impl Segments {
    /// A stable counting sort of `ids` (all asserted in 0..vocab, before anything is written).
    fn of(ids: &[i32], vocab: usize) -> Segments {
        assert!(i32::try_from(ids.len()).is_ok(), "embedding: {} tokens exceed the kernel's i32 positions", ids.len());
        let rows: Vec<usize> = ids
            .iter()
            .map(|&id| match usize::try_from(id) {
                Ok(v) if v < vocab => v,
                _ => panic!("embedding: id {id} outside 0..{vocab}"),
            })
            .collect();
        let mut count = vec![0usize; vocab];
        rows.iter().for_each(|&v| count[v] += 1);
        let mut next = vec![0usize; vocab];
        let (mut start, mut row) = (vec![0i32], Vec::new());
        let mut offset = 0;
        for (v, &c) in count.iter().enumerate().filter(|(_, &c)| c > 0) {
            next[v] = offset;
            offset += c;
            start.push(offset as i32);
            row.push(v as i32);
        }
        let mut order = vec![0i32; ids.len()];
        for (i, &v) in rows.iter().enumerate() {
            order[next[v]] = i as i32;
            next[v] += 1;
        }
        Segments { order, start, row }
    }
}

/// The number of table rows, asserting the table is whole rows of a non-empty dimension.
fn vocab_of(table_len: usize, dim: usize) -> usize {
    assert!(dim > 0, "embedding: dim must be positive");
    assert!(table_len % dim == 0, "embedding: table of {table_len} elements is not rows of {dim}");
    table_len / dim
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_group_positions_by_id_in_order() {
        let s = Segments::of(&[4, 1, 4, 0, 4, 1], 6);
        assert_eq!(s, Segments { order: vec![3, 1, 5, 0, 2, 4], start: vec![0, 1, 3, 6], row: vec![0, 1, 4] });
    }

    #[test]
    #[should_panic(expected = "id 6 outside 0..6")]
    fn segments_reject_ids_past_vocab() {
        Segments::of(&[0, 6], 6);
    }
}
