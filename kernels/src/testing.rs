//! Test support shared by every crate's tests: tolerances, closeness assertions, random inputs and the
//! finite-difference gradient check. Public (not `cfg(test)`) so that `runtime`, `autograd` and the root
//! integration tests use the same definitions.

use crate::cuda::CudaDevice;
use crate::rng::Rng;
use std::path::PathBuf;

pub mod attention;

/// An error bound of the form llm.c and burn use: `|actual − expected| ≤ abs + rel·|expected|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

impl Tolerance {
    /// f64 central differences with h = 1e-6: truncation ~h² and cancellation ~1e-16/h leave ~1e-9.
    pub const FINITE_DIFF_F64: Tolerance = Tolerance { abs: 1e-6, rel: 1e-5 };
    /// Two f32 computations of the same value by different summation orders.
    pub const F32: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };
    /// One bf16 rounding of operands (8 significant bits) with f32 accumulation.
    pub const BF16: Tolerance = Tolerance { abs: 1e-2, rel: 1e-2 };

    pub fn allows(&self, actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= self.abs + self.rel * expected.abs()
    }
}

/// Panics with the first offending index, the values and the count of offenders when any element is out of
/// tolerance, or when lengths differ, or when a value is NaN (NaN never passes).
#[track_caller]
pub fn assert_close(what: &str, actual: &[f64], expected: &[f64], tol: Tolerance) {
    assert_eq!(actual.len(), expected.len(), "{what}: length {} vs expected {}", actual.len(), expected.len());
    let bad: Vec<usize> = (0..actual.len()).filter(|&i| !tol.allows(actual[i], expected[i])).collect();
    if let Some(&i) = bad.first() {
        panic!(
            "{what}: {} of {} elements out of tolerance {:?}; first at [{i}]: got {}, expected {}",
            bad.len(),
            actual.len(),
            tol,
            actual[i],
            expected[i]
        );
    }
}

/// `n` standard-normal values.
pub fn randn(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

/// f64 values rounded to f32, for running an f32 kernel on a test's f64 inputs.
pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// f32 values widened (exactly) to f64, for comparing an f32 result with an f64 one.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Checks `analytic` = ∂loss/∂x at `x` by central differences, element by element.
///
/// Kernel tests build `loss` as Σ f(x) ⊙ g for a fixed random upstream gradient `g`, so one scalar checks the
/// whole vector-Jacobian product that a backward kernel computes.
#[track_caller]
pub fn check_gradient(what: &str, x: &[f64], analytic: &[f64], loss: impl Fn(&[f64]) -> f64) {
    check_gradient_with(what, x, analytic, loss, 1e-6, Tolerance::FINITE_DIFF_F64)
}

/// [`check_gradient`] with an explicit step and tolerance (for losses with larger curvature).
#[track_caller]
pub fn check_gradient_with(
    what: &str,
    x: &[f64],
    analytic: &[f64],
    loss: impl Fn(&[f64]) -> f64,
    h: f64,
    tol: Tolerance,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let mut xp = x.to_vec();
    let numeric: Vec<f64> = (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = loss(&xp);
            xp[i] = orig - h;
            let down = loss(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect();
    assert_close(what, analytic, &numeric, tol);
}

/// Σ a ⊙ b, the scalar loss the gradient checks differentiate.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The GPU a GPU test runs on (cuda:0), announced as `qlora-gpu: <test>: ran on <device>` for scripts/gpu-check.sh's
/// table; None after `qlora-gpu: <test>: skipped: <why>` when there is none, so the test passes on CI machines —
/// unless QLORA_REQUIRE_GPU=1 (set on the GPU machine), where a missing GPU is a failure.
pub fn gpu(test: &str) -> Option<CudaDevice> {
    match CudaDevice::new(0) {
        Ok(dev) => {
            println!("qlora-gpu: {test}: ran on {dev}");
            Some(dev)
        }
        Err(e) => {
            assert!(std::env::var("QLORA_REQUIRE_GPU").map_or(true, |v| v != "1"), "{test}: QLORA_REQUIRE_GPU=1: {e}");
            println!("qlora-gpu: {test}: skipped: {e}");
            None
        }
    }
}

/// Seconds of device time per call of `f`, back to back: the median of 7 runs of `reps` calls timed by events, each
/// queued behind a copy of a large buffer so that the host is ahead of the GPU and its launch overhead is not timed.
/// For the GPU tests' bandwidth reports.
pub fn device_seconds(dev: &CudaDevice, reps: usize, mut f: impl FnMut()) -> f64 {
    use crate::cuda::timing::Event;
    let blocker = dev.alloc::<u8>(1 << 30).unwrap();
    f();
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let busy = blocker.try_clone().unwrap();
            let start = Event::record(dev).unwrap();
            (0..reps).for_each(|_| f());
            let end = Event::record(dev).unwrap();
            end.synchronize().unwrap();
            drop(busy);
            start.elapsed_ms(&end).unwrap() as f64 * 1e-3 / reps as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The repository's tests/fixtures: QLORA_FIXTURES where a test binary runs away from its checkout (the GPU
/// machine), else relative to the calling crate's `CARGO_MANIFEST_DIR` (every crate sits one level below the root).
pub fn fixtures_dir(manifest_dir: &str) -> PathBuf {
    std::env::var_os("QLORA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(manifest_dir).join("../tests/fixtures"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_check_accepts_right_and_rejects_wrong() {
        let x = [0.3, -1.2, 2.0];
        let loss = |x: &[f64]| x.iter().map(|v| v * v * v).sum::<f64>();
        let right: Vec<f64> = x.iter().map(|v| 3.0 * v * v).collect();
        check_gradient("cube", &x, &right, loss);
        let wrong: Vec<f64> = x.iter().map(|v| 3.0 * v * v + 1e-3).collect();
        let caught = std::panic::catch_unwind(|| check_gradient("cube", &x, &wrong, loss));
        assert!(caught.is_err(), "a wrong gradient must fail the check");
    }

    #[test]
    fn nan_never_passes() {
        assert!(!Tolerance::F32.allows(f64::NAN, 1.0));
        assert!(std::panic::catch_unwind(|| assert_close("n", &[f64::NAN], &[f64::NAN], Tolerance::F32)).is_err());
    }
}
