use crate::common::upload;
use half::bf16;
use qlora_kernels::cuda;
use qlora_kernels::cuda::{CudaDevice, Error};
use qlora_kernels::testing::gpu;

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    // On a machine without CUDA this returns the driver error; with a GPU, an ordinal past the last one errs.
    let count = cuda::device_count();
    let result = CudaDevice::new(count.as_ref().map_or(0, |&c| c));
    let err = result.expect_err("no device at this ordinal");
    assert!(matches!(err, Error::NoDriver { .. } | Error::DriverTooOld { .. } | Error::NoDevice { .. }), "{err}");
    println!("qlora-gpu: no_gpu_is_an_error_not_a_panic: {err}");
}

#[test]
fn buffers_copy_and_the_allocator_reuses_and_reports() {
    let Some(dev) = gpu("buffers_copy_and_the_allocator_reuses_and_reports") else { return };
    let values: Vec<f32> = (0..1234).map(|i| i as f32 * 0.5).collect();
    let buf = upload(&dev, &values);
    assert_eq!(buf.to_vec().unwrap(), values);
    assert_eq!(buf.try_clone().unwrap().to_vec().unwrap(), values);
    assert_eq!(dev.zeros::<bf16>(777).unwrap().to_vec().unwrap(), vec![bf16::ZERO; 777]);
    let empty = dev.alloc::<i32>(0).unwrap();
    assert!(empty.is_empty() && empty.to_vec().unwrap().is_empty());

    // Other tests share the device and its allocator, so only lower bounds hold.
    let before = dev.memory_stats();
    drop(dev.alloc::<u8>(3 << 20).unwrap());
    let again = dev.alloc::<u8>(3 << 20).unwrap();
    let after = dev.memory_stats();
    assert!(after.cache_hits > before.cache_hits, "a dropped block is reused: {before:?} → {after:?}");
    assert!(after.current >= 3 << 20 && after.reserved >= after.current && after.peak >= after.current);
    drop(again);

    let (free, total) = dev.mem_info().unwrap();
    assert!(free <= total && total > 0);
    let err = dev.alloc::<u8>(total * 4).expect_err("four times the GPU's memory");
    let msg = err.to_string();
    assert!(matches!(err, Error::OutOfMemory { .. }) && msg.contains("micro-batch"), "{msg}");
    println!("qlora-gpu: out-of-memory message: {msg}");
    dev.empty_cache().unwrap();
}

#[test]
fn hopper_gets_sm_90a() {
    let Some(dev) = gpu("hopper_gets_sm_90a") else { return };
    let target = dev.target().to_string();
    match dev.compute_capability() {
        (9, 0) => assert_eq!(target, "sm_90a"),
        (major, minor) => println!("qlora-gpu: hopper_gets_sm_90a: not Hopper ({major}.{minor}): {target}"),
    }
}

/// Overlapping launches (programmatic dependent launch, on Hopper) keep the stream's order: each kernel of a chain
/// that reads what the previous one wrote (y += 1 in place, 32 times) sees all of it, and one that writes what the
/// previous one reads (the in-place add after a copy of y) does not change what that one read. A kernel that ran
/// ahead of its wait would lose increments or copy a later y.
#[test]
fn overlapping_launches_keep_stream_order() {
    let Some(dev) = gpu("overlapping_launches_keep_stream_order") else { return };
    println!(
        "qlora-gpu: overlapping_launches_keep_stream_order: overlapping launches {}",
        if dev.overlapping_launches() { "on" } else { "off (not sm_90+, or QLORA_PDL=0)" }
    );
    // More than a wave of 8-element chunks, so that the kernels' tails are long enough to overlap.
    let n = 3 << 20;
    let ones = upload(&dev, &vec![1.0f32; n]);
    let mut y = dev.zeros::<f32>(n).unwrap();
    let mut copies = Vec::new();
    for _ in 0..32 {
        let mut copy = dev.alloc::<f32>(n).unwrap();
        cuda::elementwise::scale(&y, 1.0, &mut copy).unwrap();
        cuda::elementwise::axpy(1.0, &ones, &mut y).unwrap();
        copies.push(copy);
    }
    for (i, copy) in copies.iter().enumerate() {
        let seen = copy.to_vec().unwrap();
        let wrong = seen.iter().position(|&v| v != i as f32);
        assert!(wrong.is_none(), "copy {i}: element {:?} is {:?}, not {i}", wrong, wrong.map(|j| seen[j]));
    }
    let y = y.to_vec().unwrap();
    assert!(y.iter().all(|&v| v == 32.0), "y: {:?} after 32 increments", y.iter().find(|&&v| v != 32.0));
}
