//! The execution contract of a training step on a GPU, through the binary: `qlora-rt bench` counts the host's waits
//! for the device during each timed step (synchronisations and reads back), and a step makes exactly one (its
//! losses and gradient norm, read together). Whole steps of the tiny Llama fixture with NF4, LoRA on every
//! projection, clipping, checkpointing and two micro-batches.
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1. The binary is CARGO_BIN_EXE_qlora-cli, or QLORA_RT_BIN when the test runs on another machine.

use qlora_runtime::testing::{fixtures_dir, gpu};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn a_training_step_waits_for_the_gpu_once() {
    if gpu("a_training_step_waits_for_the_gpu_once").is_none() {
        return;
    }
    let bin =
        std::env::var_os("QLORA_RT_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qlora-cli")), PathBuf::from);
    let model = fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama");
    let args = ["bench", "--model", model.to_str().unwrap(), "--device", "cuda", "--batch", "2", "--seq", "48"];
    let out = Command::new(bin)
        .args(args)
        .args(["--grad-accum", "2", "--steps", "3", "--warmup", "1", "--json"])
        .output()
        .expect("run qlora-rt");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_str(stdout.lines().last().expect("one JSON line")).expect("JSON");
    let syncs = report["syncs_per_step"].as_f64().expect("syncs_per_step");
    println!("qlora-gpu: host waits per step: {syncs}");
    assert_eq!(syncs, 1.0, "a step reads its losses and gradient norm once and waits for nothing else");
}
