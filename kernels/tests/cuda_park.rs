//! Parking what a closure left alive (`qlora_kernels::cuda::park`): buffers a recording saw come back bit for bit
//! after their device blocks were handed to new owners that overwrote them, through a prefetch or through a restore
//! alone; buffers the caller keeps, buffers dropped before parking, and buffers of other categories stay put; a
//! parked buffer read before its restore comes back on the spot (a counted fault) with its values; a buffer dropped
//! while away or arriving gives its memory back.
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1.

use qlora_kernels::cuda::park::{faults, recording, ParkedSet};
use qlora_kernels::cuda::{tagged, Category, CudaDevice, DeviceBuffer};
use qlora_kernels::testing::gpu;
use qlora_kernels::Rng;

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// Takes every cached block of each size in `lens` and fills it with NaN: the blocks parking gave back now hold
/// poison, so values that came back intact came from the host.
fn poison_freed_blocks(dev: &CudaDevice, lens: &[usize]) -> Vec<DeviceBuffer<f32>> {
    lens.iter()
        .map(|&n| {
            let mut b = dev.alloc::<f32>(n).unwrap();
            b.fill(f32::NAN).unwrap();
            b
        })
        .collect()
}

#[test]
fn parked_buffers_come_back_bit_for_bit() {
    let test = "parked_buffers_come_back_bit_for_bit";
    let Some(dev) = gpu(test) else { return };
    let mut rng = Rng::new(21);
    let lens = [1usize, 7, 65_537, 3 << 20];
    let values: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n)).collect();
    let kept_values = random(&mut rng, 1000);
    let faults_before = faults();
    for prefetch in [true, false] {
        let ((saved, kept, scratch), recorded) = recording(|| {
            let saved: Vec<_> = values.iter().map(|v| dev.upload(v).unwrap()).collect();
            // Dropped before parking: nothing to park.
            drop(dev.upload(&random(&mut Rng::new(1), 4096)).unwrap());
            let kept = dev.upload(&kept_values).unwrap();
            let scratch = tagged(Category::Scratch, || dev.upload(&kept_values).unwrap());
            (saved, kept, scratch)
        });
        let set = ParkedSet::park(recorded, &[kept.park_id()]).unwrap();
        assert_eq!(set.bytes(), lens.iter().sum::<usize>() * 4, "the recorded activations alive, less the kept one");
        let in_use = dev.memory_stats().current;
        set.release().unwrap();
        let freed = in_use - dev.memory_stats().current;
        assert!(freed >= set.bytes(), "released {freed} bytes of device memory for {} parked", set.bytes());
        let poison = poison_freed_blocks(&dev, &lens);
        if prefetch {
            set.prefetch().unwrap();
        }
        set.restore().unwrap();
        for (buffer, v) in saved.iter().zip(&values) {
            let back = buffer.to_vec().unwrap();
            assert!(back.iter().zip(v).all(|(a, b)| a.to_bits() == b.to_bits()), "{} values changed", v.len());
        }
        assert_eq!(kept.to_vec().unwrap(), kept_values);
        assert_eq!(scratch.to_vec().unwrap(), kept_values);
        assert!(poison.iter().all(|b| b.to_vec().unwrap().iter().all(|x| x.is_nan())), "the new owners kept theirs");
    }
    assert_eq!(faults(), faults_before, "every read came after a restore");
    println!("qlora-gpu: {test}: ran on {}", dev.name());
}

#[test]
fn a_parked_buffer_read_early_comes_back_on_the_spot() {
    let test = "a_parked_buffer_read_early_comes_back_on_the_spot";
    let Some(dev) = gpu(test) else { return };
    let mut rng = Rng::new(22);
    let values = random(&mut rng, 100_003);
    let (buffer, recorded) = recording(|| dev.upload(&values).unwrap());
    let set = ParkedSet::park(recorded, &[]).unwrap();
    set.release().unwrap();
    let _poison = poison_freed_blocks(&dev, &[values.len()]);
    let before = faults();
    assert_eq!(buffer.to_vec().unwrap(), values);
    assert_eq!(faults(), before + 1, "one read while away: one fault");
    // Resident again: restoring is a no-op, and reading costs no fault.
    set.restore().unwrap();
    assert_eq!(buffer.to_vec().unwrap(), values);
    assert_eq!(faults(), before + 1);

    // Dropped while away and while arriving: the memory goes back, the host copy too.
    let pinned = dev.pinned_stats().in_use;
    for prefetch in [false, true] {
        let (buffer, recorded) = recording(|| dev.upload(&values).unwrap());
        let set = ParkedSet::park(recorded, &[]).unwrap();
        set.release().unwrap();
        if prefetch {
            set.prefetch().unwrap();
        }
        let current = dev.memory_stats().current;
        drop(buffer);
        assert!(dev.memory_stats().current <= current, "dropping a parked buffer frees what it holds");
        assert_eq!(set.bytes(), 0, "nothing of the dropped buffer is left to park");
        set.restore().unwrap();
    }
    assert_eq!(dev.pinned_stats().in_use, pinned, "the host copies went back to the pool");
    println!("qlora-gpu: {test}: ran on {}", dev.name());
}

/// The host link's speed each way, which decides how many layers a step can park under its compute (pinned memory,
/// the copy stream, 1 GiB, the second of two rounds so that the pinned pool already holds the block). Prints only.
#[test]
fn host_link_bandwidth_report() {
    let test = "host_link_bandwidth_report";
    let Some(dev) = gpu(test) else { return };
    let n = 1 << 28;
    let buffer = dev.alloc::<f32>(n).unwrap();
    let bytes = (n * 4) as f64;
    let (mut out_s, mut back_s) = (0.0, 0.0);
    for _ in 0..2 {
        dev.synchronize().unwrap();
        let started = std::time::Instant::now();
        let copy = buffer.copy_to_host().unwrap();
        copy.fence().unwrap();
        dev.synchronize().unwrap();
        out_s = started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        let back = copy.upload::<f32>(n).unwrap().ready().unwrap();
        dev.synchronize().unwrap();
        back_s = started.elapsed().as_secs_f64();
        drop(back);
    }
    println!(
        "qlora-gpu: {test}: to the host {:.1} GB/s, back {:.1} GB/s (1 GiB, pinned) on {}",
        bytes / out_s / 1e9,
        bytes / back_s / 1e9,
        dev.name()
    );
}
