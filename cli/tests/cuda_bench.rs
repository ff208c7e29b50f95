//! The execution contract of a training step on a GPU, through the binary: `qlora-rt bench` counts the host's waits
//! for the device during each timed step (synchronisations and reads back), and a step makes exactly one (its
//! losses and gradient norm, read together). Whole steps of the tiny Llama fixture with NF4, LoRA on every
//! projection, clipping, checkpointing and two micro-batches; and the same with the lean memory plan, which offloads
//! the layer inputs, and the peak's split by category; and a torchrun group of one with the base sharded. And
//! `bench decode` of the same model, one sequence and two, against the copy bandwidth.
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1. The binary is CARGO_BIN_EXE_qlora-cli, or QLORA_RT_BIN when the test runs on another machine.

mod common;

use common::{gpu_test_bin, torchrun_group_of_one};
use qlora_runtime::testing::{fixtures_dir, gpu};
use serde_json::Value;
use std::process::Command;

/// `qlora-rt bench` of the tiny Llama on the GPU with `extra` flags: its JSON report.
fn bench(extra: &[&str]) -> Value {
    bench_under(extra, &[])
}

/// [`bench`] with `env` variables set.
fn bench_under(extra: &[&str], env: &[(&str, String)]) -> Value {
    let bin = gpu_test_bin();
    let model = fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama");
    let args = ["bench", "--model", model.to_str().unwrap(), "--device", "cuda", "--batch", "2", "--seq", "48"];
    let out = Command::new(bin)
        .args(args)
        .args(["--grad-accum", "2", "--steps", "3", "--warmup", "1", "--json"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run qlora-rt");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().expect("one JSON line")).expect("JSON")
}

#[test]
fn a_training_step_waits_for_the_gpu_once() {
    if gpu("a_training_step_waits_for_the_gpu_once").is_none() {
        return;
    }
    let report = bench(&[]);
    let syncs = report["syncs_per_step"].as_f64().expect("syncs_per_step");
    println!("qlora-gpu: host waits per step: {syncs}");
    assert_eq!(syncs, 1.0, "a step reads its losses and gradient norm once and waits for nothing else");
}

/// `--memory-budget lean` offloads the layer inputs through pinned memory without an extra host wait or a changed
/// loss, and the report splits the allocator's peak by what held it (the parts add up to the peak).
#[test]
fn the_lean_plan_offloads_and_the_peak_is_split_by_category() {
    if gpu("the_lean_plan_offloads_and_the_peak_is_split_by_category").is_none() {
        return;
    }
    let (plain, lean) = (bench(&[]), bench(&["--memory-budget", "lean"]));
    assert_eq!((plain["offload"].as_bool(), lean["offload"].as_bool()), (Some(false), Some(true)));
    assert_eq!((plain["offload_layers"].as_u64(), lean["offload_layers"].as_u64()), (Some(0), Some(2)), "of 2 layers");
    assert!(lean["pinned_gib"].as_f64().unwrap() > 0.0, "{lean}");
    assert_eq!(lean["loss"], plain["loss"], "offloading changes no bits");
    assert_eq!(lean["syncs_per_step"].as_f64(), Some(1.0), "the copies add no host wait");
    for report in [&plain, &lean] {
        let split = report["peak_by_category_gib"].as_object().expect("peak_by_category_gib");
        let gib = |name: &str| split[name].as_f64().unwrap();
        for held in ["weights", "adapters + optimizer", "activations"] {
            assert!(gib(held) > 0.0, "{held}: {split:?}");
        }
        let sum: f64 = split.values().map(|g| g.as_f64().unwrap()).sum();
        let peak = report["peak_gib"].as_f64().unwrap();
        assert!((sum - peak).abs() < 0.01, "the parts {sum} add up to the peak {peak}");
        println!("qlora-gpu: at the peak of {peak:.4} GiB (offload {}): {split:?}", report["offload"]);
    }
}

/// A torchrun group of one on the GPU runs the data-parallel step (NCCL) with the base sharded: the gathered layers
/// give the plain step's loss (to the attention backward's run-to-run noise) and each rank's peak is reported.
#[test]
fn a_group_of_one_benchmarks_the_sharded_step() {
    if gpu("a_group_of_one_benchmarks_the_sharded_step").is_none() {
        return;
    }
    let plain = bench(&[]);
    let sharded = bench_under(&["--shard-base"], &torchrun_group_of_one());
    println!("qlora-gpu: sharded group of one: {sharded}");
    assert_eq!((sharded["ranks"].as_u64(), sharded["backend"].as_str()), (Some(1), Some("NCCL")), "{sharded}");
    assert_eq!(sharded["shard_base"], true);
    assert_eq!(sharded["peak_gib_per_rank"].as_array().map(Vec::len), Some(1), "{sharded}");
    let (a, b) = (sharded["loss"].as_f64().unwrap(), plain["loss"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-3 * b.abs(), "{a} vs {b}");
}

/// `bench decode` of the tiny Llama on the GPU, one sequence and two (packed by the KV cache): the NF4 base stays
/// packed with the adapters unmerged, each sequence's cache outgrows its first buffer (a 30-token prompt gets 32 rows,
/// then 64), and the weights' reads are set against the copy bandwidth measured in the same run.
#[test]
fn decode_reads_its_weights_against_the_copy_bandwidth() {
    if gpu("decode_reads_its_weights_against_the_copy_bandwidth").is_none() {
        return;
    }
    let model = fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama");
    let decode = |batch: &str| -> Value {
        let args = ["bench", "decode", "--model", model.to_str().unwrap(), "--device", "cuda", "--batch", batch];
        let out = Command::new(gpu_test_bin())
            .args(args)
            .args(["--prompt", "30", "--tokens", "10", "--warmup", "1", "--copy-reps", "3", "--json"])
            .output()
            .expect("run qlora-rt");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_str(stdout.lines().last().expect("one JSON line")).expect("JSON")
    };
    let (one, two) = (decode("1"), decode("2"));
    println!("qlora-gpu: tiny Llama decode: {one}");
    for r in [&one, &two] {
        assert_eq!(
            (r["merged"].as_bool(), r["decode_steps"].as_u64(), r["dtype"].as_str()),
            (Some(false), Some(9), Some("bf16"))
        );
        assert!(r["copy_gbps"].as_f64().is_some_and(|g| g > 100.0), "{r}");
        // A tiny model's rate is a sliver of the copy's: weight_of_copy may round to 0, so it is checked against the
        // two rates it is the ratio of.
        let (rate, copy) = (r["weight_gbps"].as_f64().unwrap(), r["copy_gbps"].as_f64().unwrap());
        assert!(rate > 0.0, "{r}");
        assert!((r["weight_of_copy"].as_f64().unwrap() - rate / copy).abs() < 1e-3, "{r}");
        assert!(r["decode_device_ms"].as_f64() <= r["decode_ms"].as_f64(), "device time within the wall time: {r}");
    }
    // The second sequence reads one more embedding row: 32 bf16 values.
    assert_eq!(two["weight_bytes"].as_u64().unwrap() - one["weight_bytes"].as_u64().unwrap(), 64, "{one}\n{two}");
    assert_eq!(two["kv_bytes_per_step"].as_u64(), one["kv_bytes_per_step"].as_u64().map(|b| 2 * b));
}
