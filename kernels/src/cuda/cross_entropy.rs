//! Launchers of `kernels/cuda/cross_entropy.cu`, twins of [`crate::cross_entropy`]. Loss, log-sum-exp and the
//! upstream gradient are f32; logits and their gradient f32 or bf16.
//!
//! The CPU kernel asserts that every target is [`IGNORE_INDEX`](crate::cross_entropy::IGNORE_INDEX) or in
//! `0..vocab`; checking here would cost a device-to-host copy per call, so the kernel marks a bad target's row
//! instead: NaN loss and NaN gradient.

use super::source::Module;
use super::{config, kernel, launch, same_device, u32_arg, DeviceBuffer, GpuFloat, Result};

/// logits: [rows, vocab], targets: \[rows\] → loss: \[rows\] f32 (0 for ignored rows), lse: \[rows\] f32
pub fn cross_entropy_forward<T: GpuFloat>(
    logits: &DeviceBuffer<T>,
    targets: &DeviceBuffer<i32>,
    vocab: usize,
    loss: &mut DeviceBuffer<f32>,
    lse: &mut DeviceBuffer<f32>,
) -> Result<()> {
    let rows = check_shapes("cross_entropy_forward", logits, targets, vocab);
    assert_eq!(loss.len(), rows, "cross_entropy_forward: loss length");
    assert_eq!(lse.len(), rows, "cross_entropy_forward: lse length");
    let dev = same_device("cross_entropy_forward", &[logits.device(), targets.device(), loss.device(), lse.device()]);
    if rows == 0 {
        return Ok(());
    }
    let kernel = kernel!("cross_entropy_forward", T);
    let (px, pt, pl, pe) = (logits.ptr(), targets.ptr(), loss.ptr(), lse.ptr());
    let vocab32 = u32_arg("cross_entropy_forward: vocab", vocab);
    // SAFETY: cross_entropy_forward_T(const T* logits, const int* targets, float* loss, float* lse,
    // unsigned vocab), one block per row: logits hold rows·vocab elements, targets, loss and lse rows (asserted),
    // all on this device.
    unsafe {
        launch!(dev, Module::CrossEntropy, kernel, config(u32_arg("cross_entropy_forward: rows", rows)); px, pt, pl, pe, vocab32)
    }
}

/// d_loss: \[rows\] f32 → d_logits: [rows, vocab] = d_loss\[r\]·(softmax(logits\[r\]) − onehot(target\[r\])); zero rows
/// where ignored
pub fn cross_entropy_backward<T: GpuFloat>(
    logits: &DeviceBuffer<T>,
    targets: &DeviceBuffer<i32>,
    lse: &DeviceBuffer<f32>,
    d_loss: &DeviceBuffer<f32>,
    vocab: usize,
    d_logits: &mut DeviceBuffer<T>,
) -> Result<()> {
    let rows = check_shapes("cross_entropy_backward", logits, targets, vocab);
    assert_eq!(lse.len(), rows, "cross_entropy_backward: lse length");
    assert_eq!(d_loss.len(), rows, "cross_entropy_backward: d_loss length");
    assert_eq!(d_logits.len(), logits.len(), "cross_entropy_backward: d_logits length");
    let dev = same_device(
        "cross_entropy_backward",
        &[logits.device(), targets.device(), lse.device(), d_loss.device(), d_logits.device()],
    );
    if rows == 0 {
        return Ok(());
    }
    let kernel = kernel!("cross_entropy_backward", T);
    let (px, pt, pe, pg, pd) = (logits.ptr(), targets.ptr(), lse.ptr(), d_loss.ptr(), d_logits.ptr());
    let vocab32 = u32_arg("cross_entropy_backward: vocab", vocab);
    // SAFETY: cross_entropy_backward_T(const T* logits, const int* targets, const float* lse,
    // const float* d_loss, T* d_logits, unsigned vocab), one block per row: logits and d_logits hold rows·vocab
    // elements, targets, lse and d_loss rows (asserted), all on this device.
    unsafe {
        launch!(dev, Module::CrossEntropy, kernel, config(u32_arg("cross_entropy_backward: rows", rows)); px, pt, pe, pg, pd, vocab32)
    }
}

/// The row count, after asserting the shapes.
fn check_shapes<T: GpuFloat>(what: &str, logits: &DeviceBuffer<T>, targets: &DeviceBuffer<i32>, vocab: usize) -> usize {
    assert!(vocab > 0, "{what}: vocab must be positive");
    assert_eq!(logits.len(), targets.len() * vocab, "{what}: logits length is not rows·vocab");
    targets.len()
}
