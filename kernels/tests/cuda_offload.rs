//! Parking device buffers in pinned host memory and bringing them back (`qlora_kernels::cuda::offload`): the values
//! come back bit for bit although the source's block is handed to a new owner that overwrites it as soon as the copy
//! out is fenced, with several buffers parked and several copies back in flight at once, at odd and large sizes and
//! in every element type; the pinned pool reuses its blocks and gives them back on `empty_cache`.
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1.

use half::bf16;
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer, DeviceCopy, HostCopy};
use qlora_kernels::testing::gpu;
use qlora_kernels::Rng;

/// Lengths of one element, odd ones, one past a size class, and a 48 MiB layer input (8192 tokens × 2048 × f32... as
/// bf16 it is 4 × 2048 tokens of a 3072-wide model).
const LENS: [usize; 6] = [1, 7, 1000, 65_537, 1 << 20, 3 << 22];

/// Parks `values`, lets the source go and overwrites its block through the allocator's next owner (the same size
/// class: the same block), and returns the parked copy with that owner (kept alive, so the block stays taken).
fn park<T: DeviceCopy>(dev: &CudaDevice, values: &[T], poison: T) -> (HostCopy, DeviceBuffer<T>) {
    let src = dev.upload(values).unwrap();
    let copy = src.copy_to_host().unwrap();
    copy.fence().unwrap();
    drop(src);
    let mut next = dev.alloc::<T>(values.len()).unwrap();
    next.fill(poison).unwrap();
    (copy, next)
}

#[test]
fn parked_buffers_come_back_bit_for_bit() {
    let Some(dev) = gpu("parked_buffers_come_back_bit_for_bit") else { return };
    let mut rng = Rng::new(11);
    let inputs: Vec<Vec<f32>> = LENS.iter().map(|&n| (0..n).map(|_| rng.normal() as f32).collect()).collect();
    let parked: Vec<_> = inputs.iter().map(|v| park(&dev, v, f32::NAN)).collect();
    let bytes: usize = LENS.iter().map(|n| n * 4).sum();
    assert!(dev.pinned_stats().in_use >= bytes, "{:?} for {bytes} parked bytes", dev.pinned_stats());

    // Back in reverse order, as backward brings layer inputs back, every copy started before the first is used.
    let arrivals: Vec<_> = parked.iter().rev().map(|(copy, next)| copy.upload::<f32>(next.len()).unwrap()).collect();
    for (values, arrival) in inputs.iter().rev().zip(arrivals) {
        let back = arrival.ready().unwrap().to_vec().unwrap();
        let same = back.iter().zip(values).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{} values came back changed", values.len());
    }
    // The poisoned owners really did get the source blocks' memory (else the test proves nothing about ordering).
    for (_, next) in &parked {
        assert!(next.to_vec().unwrap().iter().all(|v| v.is_nan()));
    }

    // A copy can come back twice (a recompute after an error), and the pool takes back and reuses its blocks.
    let (copy, _) = &parked[2];
    assert_eq!(copy.upload::<f32>(LENS[2]).unwrap().ready().unwrap().to_vec().unwrap(), inputs[2]);
    let reserved = dev.pinned_stats().reserved;
    drop(parked);
    assert_eq!(dev.pinned_stats().in_use, 0);
    let again: Vec<_> = inputs.iter().map(|v| park(&dev, v, 0.0)).collect();
    assert_eq!(dev.pinned_stats().reserved, reserved, "the same sizes again: cached pinned blocks, no new ones");
    drop(again);
    dev.empty_cache().unwrap();
    assert_eq!(dev.pinned_stats().reserved, 0);
}

#[test]
fn every_element_type_and_an_empty_buffer_park() {
    let Some(dev) = gpu("every_element_type_and_an_empty_buffer_park") else { return };
    let mut rng = Rng::new(12);
    let n = 4099;
    let halves: Vec<bf16> = (0..n).map(|_| bf16::from_f64(rng.normal())).collect();
    let (copy, next) = park(&dev, &halves, bf16::from_f32(-7.0));
    assert_eq!(copy.bytes(), 2 * n);
    assert_eq!(copy.upload::<bf16>(n).unwrap().ready().unwrap().to_vec().unwrap(), halves);
    drop(next);
    let ints: Vec<i32> = (0..n as i32).map(|i| i * 7919 - 3).collect();
    let (copy, _next) = park(&dev, &ints, -1);
    assert_eq!(copy.upload::<i32>(n).unwrap().ready().unwrap().to_vec().unwrap(), ints);
    let bytes: Vec<u8> = (0..n).map(|i| (i * 31) as u8).collect();
    let (copy, _next) = park(&dev, &bytes, 0xAA);
    assert_eq!(copy.upload::<u8>(n).unwrap().ready().unwrap().to_vec().unwrap(), bytes);
    let empty = dev.alloc::<f32>(0).unwrap().copy_to_host().unwrap();
    assert_eq!(empty.upload::<f32>(0).unwrap().ready().unwrap().len(), 0);
}
