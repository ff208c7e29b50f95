//! Summaries of repeated timings: the median is what the reports quote (robust to a stray slow repetition), with the
//! extremes beside it.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The summary of `samples` (at least one).
pub fn summarize(samples: &[f64]) -> Summary {
    assert!(!samples.is_empty(), "summarize: no samples");
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 };
    Summary { median, min: s[0], max: s[n - 1] }
}

/// The `q`-quantile of `samples` (at least one) by the nearest-rank rule: the smallest sample with at least a
/// fraction `q` of them at or below it (p90: q = 0.9). `scripts/decode/hf_generate.py` uses the same rule.
pub fn percentile(samples: &[f64], q: f64) -> f64 {
    assert!(!samples.is_empty(), "percentile: no samples");
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(summarize(&[3.0, 1.0, 2.0]), Summary { median: 2.0, min: 1.0, max: 3.0 });
        assert_eq!(summarize(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let ten: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        assert_eq!((percentile(&ten, 0.9), percentile(&ten, 0.95), percentile(&ten, 0.0)), (9.0, 10.0, 1.0));
        assert_eq!(percentile(&[7.0], 0.9), 7.0);
    }
}
