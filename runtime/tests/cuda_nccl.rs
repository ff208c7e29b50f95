//! The NCCL group on the GPU machine. A single-GPU machine can hold a group of one rank only (NCCL refuses two ranks
//! on one device), so this runs every collective through it: the library found and loaded, the communicator made on
//! the GPU, each collective's bytes out and back through device memory, the deadline-guarded wait, gathers started on
//! NCCL's stream and finished later, and the argument checks; what several ranks compute is
//! `cli/tests/cuda_nccl_finetune.rs`'s (two GPUs).
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1. A missing NCCL on a GPU machine fails, naming where it was looked for.

use qlora_runtime::dist::launch::Launch;
use qlora_runtime::dist::nccl::NcclRank;
use qlora_runtime::dist::{Buffer, Communicator};
use qlora_runtime::testing::gpu;
use qlora_runtime::{Device, Tensor};

#[test]
fn a_group_of_one_runs_every_collective_through_the_gpu() {
    let Some(dev) = gpu("a_group_of_one_runs_every_collective_through_the_gpu") else { return };
    let launch = Launch { rank: 0, world_size: 1, local_rank: dev.ordinal(), local_world_size: 1, master: None };
    let g = NcclRank::connect(&launch, &dev).unwrap();
    assert_eq!((g.rank(), g.world_size(), g.backend()), (0, 1, "NCCL"));

    // A sum over one rank is the values themselves, to the bit (f64 beyond f32's range included).
    let mut f = [1.5f32, -2.0, 3.25e-30, f32::MAX];
    g.all_reduce_sum(Buffer::F32(&mut f)).unwrap();
    assert_eq!(f, [1.5, -2.0, 3.25e-30, f32::MAX]);
    let mut d = [1e300f64, -7.0, 2f64.powi(60) + 1.0];
    g.all_reduce_sum(Buffer::F64(&mut d)).unwrap();
    assert_eq!(d, [1e300, -7.0, 2f64.powi(60) + 1.0]);
    let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
    assert_eq!(g.all_gather(&values).unwrap(), values);
    // Gradients gather device to device: the tensor stays on the GPU.
    let local =
        Tensor::from_vec(values.clone(), &[values.len()]).unwrap().to_device(Device::Cuda(dev.ordinal())).unwrap();
    let all = g.all_gather_tensor(&local).unwrap();
    assert_eq!((all.device(), all.to_vec::<f32>()), (local.device(), values.clone()));
    // A sharded base's bytes too, from a view (made whole first); and bytes through the host.
    let packed: Vec<u8> = (0..999).map(|i| (i * 7 % 256) as u8).collect();
    let view = Tensor::from_vec(packed.clone(), &[999]).unwrap().to_device(local.device()).unwrap();
    let view = view.narrow(0, 3, 990).unwrap();
    let all = g.all_gather_tensor(&view).unwrap();
    assert_eq!((all.device(), all.to_vec::<u8>()), (local.device(), packed[3..993].to_vec()));
    assert_eq!(g.all_gather_bytes(&packed).unwrap(), packed);
    // Started gathers run on NCCL's stream while the caller goes on; finished, the compute stream has waited for
    // them. Two in flight at once, finished in the other order, and one dropped unfinished.
    let first = g.start_all_gather_tensor(&view).unwrap();
    let second = g.start_all_gather_tensor(&local).unwrap();
    let dropped = g.start_all_gather_tensor(&local).unwrap();
    assert_eq!(second.finish().unwrap().to_vec::<f32>(), values);
    drop(dropped);
    let got = first.finish().unwrap();
    assert_eq!((got.device(), got.to_vec::<u8>()), (local.device(), packed[3..993].to_vec()));
    let mut bytes = *b"every rank gets rank 0's bytes";
    g.broadcast(&mut bytes, 0).unwrap();
    assert_eq!(&bytes, b"every rank gets rank 0's bytes");
    g.barrier().unwrap();
    // Empty buffers need no collective; every rank passes the same length, so all skip together.
    g.all_reduce_sum(Buffer::F32(&mut [])).unwrap();
    assert!(g.all_gather(&[]).unwrap().is_empty());

    let e = g.broadcast(&mut bytes, 1).unwrap_err().to_string();
    assert!(e.contains("root 1 of 1 ranks"), "{e}");
    // The group still works after a refused call (nothing was issued).
    g.barrier().unwrap();
}

/// Two ranks on two GPUs: this test as rank 0 and a copy of its binary as rank 1 (run again with
/// `QLORA_NCCL_TEST_RANK=1`), each with values of its own, so that what a group of one cannot show is checked: sums
/// over both, gathers in rank order (through the host, device to device, and started, then finished in the other
/// order), a broadcast from rank 1. Skipped below two GPUs; the collectives' deadline is the environment's
/// (`QLORA_NCCL_TIMEOUT`; rank 1 is given 120 s).
#[test]
fn two_ranks_sum_gather_and_broadcast_in_rank_order() {
    let name = "two_ranks_sum_gather_and_broadcast_in_rank_order";
    let rank: usize = std::env::var("QLORA_NCCL_TEST_RANK").map_or(0, |r| r.parse().expect("a rank"));
    let mut peer = None;
    let port = if rank == 0 {
        let visible = qlora_runtime::device_count().unwrap_or(0);
        if visible < 2 {
            println!("qlora-gpu: {name}: skipped: {visible} GPU(s), two needed");
            return;
        }
        println!("qlora-gpu: {name}: ran on 2 GPUs");
        let port = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port();
        let exe = std::env::current_exe().unwrap();
        let child = std::process::Command::new(exe)
            .args(["--exact", name, "--nocapture", "--test-threads", "1"])
            .env("QLORA_NCCL_TEST_RANK", "1")
            .env("QLORA_NCCL_TEST_PORT", port.to_string())
            .env("QLORA_NCCL_TIMEOUT", "120")
            .spawn()
            .unwrap();
        peer = Some(child);
        port
    } else {
        std::env::var("QLORA_NCCL_TEST_PORT").unwrap().parse().unwrap()
    };
    let dev = qlora_runtime::cuda_device(rank).unwrap();
    let master = Some(("127.0.0.1".to_string(), port));
    let launch = Launch { rank, world_size: 2, local_rank: rank, local_world_size: 2, master };
    let g = NcclRank::connect(&launch, &dev).unwrap();
    assert_eq!((g.rank(), g.world_size()), (rank, 2));

    let r = rank as f32;
    let mut f = [1.0 + r, 10.0 * (1.0 + r)];
    g.all_reduce_sum(Buffer::F32(&mut f)).unwrap();
    assert_eq!(f, [3.0, 30.0]);
    let mut d = [2f64.powi(60) * (1.0 + rank as f64)];
    g.all_reduce_sum(Buffer::F64(&mut d)).unwrap();
    assert_eq!(d, [3.0 * 2f64.powi(60)]);
    let mine = |rank: usize| -> Vec<f32> { (0..1000).map(|i| (rank * 10_000 + i) as f32).collect() };
    let both = [mine(0), mine(1)].concat();
    assert_eq!(g.all_gather(&mine(rank)).unwrap(), both);
    let on_gpu = |v: Vec<f32>| Tensor::from_vec(v, &[1000]).unwrap().to_device(Device::Cuda(dev.ordinal())).unwrap();
    let all = g.all_gather_tensor(&on_gpu(mine(rank))).unwrap();
    assert_eq!((all.device(), all.to_vec::<f32>()), (Device::Cuda(dev.ordinal()), both.clone()));
    let bytes: Vec<u8> = (0..777).map(|i| ((i * 3 + 101 * rank) % 256) as u8).collect();
    let want: Vec<u8> = (0..2).flat_map(|r| (0..777).map(move |i| ((i * 3 + 101 * r) % 256) as u8)).collect();
    assert_eq!(g.all_gather_bytes(&bytes).unwrap(), want);
    let first = g.start_all_gather_tensor(&on_gpu(mine(rank))).unwrap();
    let second = g.start_all_gather_tensor(&on_gpu(mine(1 - rank))).unwrap();
    let swapped = [mine(1), mine(0)].concat();
    assert_eq!(second.finish().unwrap().to_vec::<f32>(), swapped);
    assert_eq!(first.finish().unwrap().to_vec::<f32>(), both);
    let mut text = if rank == 1 { *b"rank 1's bytes" } else { [0u8; 14] };
    g.broadcast(&mut text, 1).unwrap();
    assert_eq!(&text, b"rank 1's bytes");
    g.barrier().unwrap();
    if let Some(mut child) = peer {
        assert!(child.wait().unwrap().success(), "rank 1's process failed (its output is above)");
    }
}
