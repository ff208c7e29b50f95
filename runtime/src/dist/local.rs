//! The in-process group: threads as ranks, exchanging through one shared table.
//!
//! Each collective is one exchange: every rank puts its contribution in its slot; the last to arrive seals the table
//! as that round's result and wakes the others; each rank then computes its answer from all contributions itself,
//! always in rank order, so the answer is the same bits on every rank whatever order the threads ran in. A rank
//! waits for a round's result before it can contribute to the next, so one sealed result per round suffices.

use super::{Buffer, Communicator};
use crate::{Error, Result};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// What a rank brings to a collective: which one it called (with its root), and its data.
#[derive(Clone, Debug)]
struct Contribution {
    op: &'static str,
    root: usize,
    data: Data,
}

#[derive(Clone, Debug)]
enum Data {
    F32(Vec<f32>),
    F64(Vec<f64>),
    Bytes(Vec<u8>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::Bytes(v) => v.len(),
        }
    }

    // The other ranks' data has the dtype of this rank's: `exchange` checked it.
    fn f32s(&self) -> &[f32] {
        let Data::F32(v) = self else { unreachable!("exchange checked every rank's dtype") };
        v
    }

    fn f64s(&self) -> &[f64] {
        let Data::F64(v) = self else { unreachable!("exchange checked every rank's dtype") };
        v
    }

    fn bytes(&self) -> &[u8] {
        let Data::Bytes(v) = self else { unreachable!("exchange checked every rank's dtype") };
        v
    }

    fn kind(&self) -> &'static str {
        match self {
            Data::F32(_) => "f32",
            Data::F64(_) => "f64",
            Data::Bytes(_) => "bytes",
        }
    }
}

struct Table {
    /// Contributions to the round in progress, by rank.
    slots: Vec<Option<Contribution>>,
    /// Rounds sealed so far; a waiting rank knows its round is done when this moves past it.
    round: u64,
    /// The last sealed round's contributions, by rank.
    sealed: Arc<Vec<Contribution>>,
    /// A rank whose handle was dropped: no round it has not joined can ever complete.
    left: Option<usize>,
}

struct Shared {
    table: Mutex<Table>,
    changed: Condvar,
}

/// The ranks of an in-process group of `world_size` (at least one), to be moved one to each thread.
pub fn local_group(world_size: usize) -> Result<Vec<LocalRank>> {
    if world_size == 0 {
        return Err(Error::invalid("local_group", "a group needs at least one rank"));
    }
    let table = Table { slots: vec![None; world_size], round: 0, sealed: Arc::new(Vec::new()), left: None };
    let shared = Arc::new(Shared { table: Mutex::new(table), changed: Condvar::new() });
    Ok((0..world_size).map(|rank| LocalRank { rank, world_size, shared: shared.clone() }).collect())
}

/// One rank of a [`local_group`]. Dropping it (its thread finished or failed) makes the other ranks' later
/// collectives fail with an error naming it.
pub struct LocalRank {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

// A poisoned lock means a rank panicked while holding it; the table is only ever changed whole under the lock,
// so it is still consistent, and the panicking rank's drop reports it as gone.
fn lock(m: &Mutex<Table>) -> MutexGuard<'_, Table> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LocalRank {
    /// Contributes to the next round and returns every rank's contribution to it, checked to be the same
    /// collective with the same root, dtype and length.
    fn exchange(&self, mine: Contribution) -> Result<Arc<Vec<Contribution>>> {
        let op = mine.op;
        let mut table = lock(&self.shared.table);
        if let Some(gone) = table.left {
            return Err(Error::RankLeft { op, rank: gone });
        }
        let round = table.round;
        table.slots[self.rank] = Some(mine);
        if table.slots.iter().all(Option::is_some) {
            let all = table.slots.iter_mut().map(|s| s.take().expect("every slot was just checked")).collect();
            table.sealed = Arc::new(all);
            table.round += 1;
            self.shared.changed.notify_all();
        }
        while table.round == round {
            if let Some(gone) = table.left {
                return Err(Error::RankLeft { op, rank: gone });
            }
            table = self.shared.changed.wait(table).unwrap_or_else(|e| e.into_inner());
        }
        let all = table.sealed.clone();
        drop(table);
        let first = &all[0];
        for (rank, c) in all.iter().enumerate() {
            if c.op != first.op || c.root != first.root {
                let msg = format!(
                    "rank {rank} called {} (root {}) while rank 0 called {} (root {})",
                    c.op, c.root, first.op, first.root
                );
                return Err(Error::invalid(op, msg));
            }
            if c.data.kind() != first.data.kind() || c.data.len() != first.data.len() {
                let (a, b) = ((c.data.kind(), c.data.len()), (first.data.kind(), first.data.len()));
                return Err(Error::invalid(
                    op,
                    format!("rank {rank} gave {a:?} (dtype, length) while rank 0 gave {b:?}"),
                ));
            }
        }
        Ok(all)
    }

    fn contribute(&self, op: &'static str, root: usize, data: Data) -> Result<Arc<Vec<Contribution>>> {
        if root >= self.world_size {
            return Err(Error::invalid(op, format!("root {root} is not a rank of a group of {}", self.world_size)));
        }
        self.exchange(Contribution { op, root, data })
    }
}

/// `out` = ((parts₀ + parts₁) + parts₂)…: the ranks' values summed in rank order.
fn sum_in_rank_order<'p, T: Copy + std::ops::AddAssign + 'p>(out: &mut [T], mut parts: impl Iterator<Item = &'p [T]>) {
    out.copy_from_slice(parts.next().expect("a group has a rank 0"));
    for part in parts {
        out.iter_mut().zip(part).for_each(|(o, x)| *o += *x);
    }
}

impl Communicator for LocalRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn backend(&self) -> &'static str {
        "in-process"
    }

    fn all_reduce_sum(&self, buf: Buffer<'_>) -> Result<()> {
        const OP: &str = "all_reduce_sum";
        match buf {
            Buffer::F32(b) => {
                let all = self.contribute(OP, 0, Data::F32(b.to_vec()))?;
                sum_in_rank_order(b, all.iter().map(|c| c.data.f32s()));
            }
            Buffer::F64(b) => {
                let all = self.contribute(OP, 0, Data::F64(b.to_vec()))?;
                sum_in_rank_order(b, all.iter().map(|c| c.data.f64s()));
            }
        }
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let all = self.contribute("all_gather", 0, Data::F32(local.to_vec()))?;
        Ok(all.iter().flat_map(|c| c.data.f32s().iter().copied()).collect())
    }

    fn all_gather_bytes(&self, local: &[u8]) -> Result<Vec<u8>> {
        let all = self.contribute("all_gather_bytes", 0, Data::Bytes(local.to_vec()))?;
        Ok(all.iter().flat_map(|c| c.data.bytes().iter().copied()).collect())
    }

    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()> {
        let all = self.contribute("broadcast", root, Data::Bytes(buf.to_vec()))?;
        buf.copy_from_slice(all[root].data.bytes());
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.contribute("barrier", 0, Data::Bytes(Vec::new())).map(|_| ())
    }
}

impl Drop for LocalRank {
    fn drop(&mut self) {
        let mut table = lock(&self.shared.table);
        table.left.get_or_insert(self.rank);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// Runs `f` on every rank of a group of `n`, one thread each; the results by rank.
    fn on_ranks<T: Send>(n: usize, f: impl Fn(&LocalRank) -> T + Sync) -> Vec<T> {
        let ranks = local_group(n).unwrap();
        thread::scope(|s| {
            let handles: Vec<_> = ranks
                .into_iter()
                .map(|r| {
                    let f = &f;
                    s.spawn(move || f(&r))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn collectives_give_every_rank_the_same_answer() {
        for n in [1, 2, 3, 5] {
            let results = on_ranks(n, |c| {
                let r = c.rank() as f32;
                let mut grads = [r, 0.5 * r, -1.0];
                c.all_reduce_sum(Buffer::F32(&mut grads)).unwrap();
                let mut counts = [c.rank() as f64 + 1.0];
                c.all_reduce_sum(Buffer::F64(&mut counts)).unwrap();
                let gathered = c.all_gather(&[r, r + 0.25]).unwrap();
                let local = crate::Tensor::from_vec(vec![r, r + 0.25], &[2]).unwrap();
                assert_eq!(c.all_gather_tensor(&local).unwrap().to_vec::<f32>(), gathered, "tensors gather the same");
                let ints = crate::Tensor::from_vec(vec![1i32], &[1]).unwrap();
                assert!(c.all_gather_tensor(&ints).unwrap_err().to_string().contains("expects f32 or u8 [n]"));
                let bytes = c.all_gather_bytes(&[c.rank() as u8, 7]).unwrap();
                assert_eq!(bytes, (0..n as u8).flat_map(|r| [r, 7]).collect::<Vec<u8>>());
                let local = crate::Tensor::from_vec(vec![c.rank() as u8, 7], &[2]).unwrap();
                assert_eq!(c.all_gather_tensor(&local).unwrap().to_vec::<u8>(), bytes, "u8 tensors gather the same");
                let mut flag = [c.rank() as u8; 3];
                c.broadcast(&mut flag, n - 1).unwrap();
                c.barrier().unwrap();
                (c.world_size(), grads, counts, gathered, flag)
            });
            let s = (0..n).map(|r| r as f32).sum::<f32>();
            let gathered: Vec<f32> = (0..n).flat_map(|r| [r as f32, r as f32 + 0.25]).collect();
            let tri = (n * (n + 1) / 2) as f64;
            for got in results {
                assert_eq!(got, (n, [s, 0.5 * s, -(n as f32)], [tri], gathered.clone(), [(n - 1) as u8; 3]));
            }
        }
    }

    /// Each rank's answer is (x₀ + x₁) + x₂ whatever order the threads arrive in: values chosen so that
    /// another order rounds differently.
    #[test]
    fn sums_run_in_rank_order() {
        let values = [1.0f32, 1e8, -1e8];
        for _ in 0..20 {
            let sums = on_ranks(3, |c| {
                thread::sleep(std::time::Duration::from_micros(((3 - c.rank()) * 100) as u64));
                let mut x = [values[c.rank()]];
                c.all_reduce_sum(Buffer::F32(&mut x)).unwrap();
                x[0]
            });
            assert_eq!(sums, vec![(1.0f32 + 1e8) - 1e8; 3]);
            assert_ne!(sums[0], 1.0f32 + (1e8 - 1e8), "the values must tell the orders apart");
        }
    }

    #[test]
    fn mismatched_calls_and_departed_ranks_are_errors_not_hangs() {
        let errors = on_ranks(2, |c| match c.rank() {
            0 => c.all_gather(&[1.0]).unwrap_err().to_string(),
            _ => c.broadcast(&mut [0], 0).unwrap_err().to_string(),
        });
        assert!(errors.iter().all(|e| e.contains("rank 1 called broadcast (root 0) while rank 0 called all_gather")));
        let errors = on_ranks(2, |c| c.all_gather(&vec![0.0; c.rank() + 1]).unwrap_err().to_string());
        assert!(errors.iter().all(|e| e.contains("rank 1 gave (\"f32\", 2) (dtype, length) while rank 0 gave")));
        let errors = on_ranks(2, |c| {
            let mut counts = [1.0f64];
            let mut grads = [1.0f32];
            let e = match c.rank() {
                0 => c.all_reduce_sum(Buffer::F64(&mut counts)),
                _ => c.all_reduce_sum(Buffer::F32(&mut grads)),
            };
            e.unwrap_err().to_string()
        });
        assert!(errors[0].contains("dtype, length"), "{errors:?}");
        assert!(on_ranks(2, |c| c.broadcast(&mut [0], 2).unwrap_err().to_string())[0].contains("root 2 is not a rank"));

        // Rank 1 finishes early (drops its handle): rank 0's next collective fails at once, naming it.
        let mut ranks = local_group(2).unwrap();
        let one = ranks.pop().unwrap();
        let waiting = thread::spawn(move || ranks[0].barrier().unwrap_err().to_string());
        thread::sleep(std::time::Duration::from_millis(50));
        drop(one);
        assert_eq!(waiting.join().unwrap(), "barrier: rank 1 left the group");
        assert!(local_group(0).is_err());
    }
}
