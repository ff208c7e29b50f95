//! Sequence packing: tokenized examples grouped into rows of at most `max_len` tokens, whole examples only
//! (boundaries are kept, so attention and positions restart per example: no cross-contamination).

use crate::transformer::Batch;

/// One tokenized example; `labels[i]` = −100 marks token i as not trained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<i32>,
    pub labels: Vec<i32>,
}

impl Example {
    /// Targets that train something once shifted (the first token is never a target).
    pub fn trained_targets(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l >= 0).count()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Examples cut to `max_len`.
    pub truncated: usize,
    /// Examples dropped because no token of theirs is trained (e.g. everything masked, or one token long).
    pub untrainable: usize,
}

/// Best-fit decreasing: longest examples first, each into the fullest row it still fits (deterministic:
/// ties keep input order). Examples longer than `max_len` are truncated to it.
pub fn pack(examples: Vec<Example>, max_len: usize) -> (Vec<Vec<Example>>, PackStats) {
    let mut stats = PackStats::default();
    let mut kept: Vec<Example> = Vec::with_capacity(examples.len());
    for mut e in examples {
        if e.ids.len() > max_len {
            e.ids.truncate(max_len);
            e.labels.truncate(max_len);
            stats.truncated += 1;
        }
        if e.trained_targets() == 0 {
            stats.untrainable += 1;
        } else {
            kept.push(e);
        }
    }
    let mut order: Vec<usize> = (0..kept.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(kept[i].ids.len()));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new(); // (tokens used, example indices)
    for i in order {
        let len = kept[i].ids.len();
        let best = rows.iter_mut().filter(|(used, _)| used + len <= max_len).max_by_key(|(used, _)| *used);
        match best {
            Some((used, members)) => {
                *used += len;
                members.push(i);
            }
            None => rows.push((len, vec![i])),
        }
    }
    let mut slots: Vec<Option<Example>> = kept.into_iter().map(Some).collect();
    let rows = rows
        .into_iter()
        .map(|(_, members)| members.into_iter().map(|i| slots[i].take().expect("each example packed once")).collect())
        .collect();
    (rows, stats)
}

/// One packed row as a model batch.
pub fn row_batch(row: &[Example]) -> qlora_runtime::Result<Batch> {
    let seqs: Vec<(Vec<i32>, Vec<i32>)> = row.iter().map(|e| (e.ids.clone(), e.labels.clone())).collect();
    Batch::pack(&seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(len: usize, tag: i32) -> Example {
        Example { ids: vec![tag; len], labels: vec![tag; len] }
    }

    #[test]
    fn best_fit_keeps_examples_whole_and_rows_within_budget() {
        let examples = vec![ex(5, 1), ex(3, 2), ex(8, 3), ex(2, 4), ex(12, 5), ex(1, 6)];
        let (rows, stats) = pack(examples, 10);
        assert_eq!(
            stats,
            PackStats { truncated: 1, untrainable: 1 },
            "12 is cut to 10; a 1-token example trains nothing"
        );
        assert!(rows.iter().all(|r| r.iter().map(|e| e.ids.len()).sum::<usize>() <= 10));
        let total: usize = rows.iter().flatten().map(|e| e.ids.len()).sum();
        assert_eq!(total, 10 + 8 + 5 + 3 + 2);
        assert_eq!(rows.len(), 3, "10 | 8+2 | 5+3: {rows:?}");
    }

    #[test]
    fn packed_batches_never_train_across_boundaries() {
        let a = Example { ids: vec![10, 11, 12], labels: vec![-100, 11, 12] };
        let b = Example { ids: vec![20, 21], labels: vec![20, 21] };
        let batch = row_batch(&[a, b]).unwrap();
        assert_eq!(batch.ids.to_vec::<i32>(), vec![10, 11, 12, 20, 21]);
        assert_eq!(batch.positions.to_vec::<i32>(), vec![0, 1, 2, 0, 1]);
        assert_eq!(batch.cu_seqlens.host(), [0, 3, 5]);
        // Token 12 must not learn to predict 20: the last target of each sequence is ignored.
        assert_eq!(batch.targets.to_vec::<i32>(), vec![11, 12, -100, 21, -100]);
        assert_eq!(batch.trained_tokens(), 3);
    }
}
