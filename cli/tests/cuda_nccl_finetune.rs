//! Data parallelism on GPUs through the binary, against the plain run of one GPU: torchrun's group of one on a
//! single GPU (the whole multi-GPU path: NCCL, each micro-batch's record gathered device to device, the replay), and
//! `finetune --gpus 2` on a machine with two GPUs (two processes, one rank each), each also with `--shard-base`
//! (the base's layers gathered GPU to GPU as they run). Each trains the plain run: the same
//! steps, tokens and learning rates, and losses, gradient norms and evaluation losses within [`REL`]. The ranks replay
//! every micro-batch's gradients in order, as `--ranks` does on the CPU (`cli/tests/parallel.rs`, bit for bit there);
//! on GPUs a micro-batch's gradient is not the same bits from run to run (the attention backward adds dQ with
//! atomics), hence a tolerance: one GPU's run-to-run noise, far below bf16's 2e-2.
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1, and fewer than two GPUs skip the two-GPU test (always). The binary is CARGO_BIN_EXE_qlora-cli,
//! or QLORA_RT_BIN when the test runs on another machine; the fixture comes from CARGO_MANIFEST_DIR, or
//! QLORA_FIXTURES.

mod common;

use common::{chat_data, gpu_test_bin, torchrun_group_of_one};
use qlora_runtime::testing::{fixtures_dir, gpu};
use serde_json::{Map, Value};
use std::path::Path;
use std::process::Command;

const REL: f64 = 1e-3;

/// Four steps of four micro-batches (unless `extra` gives `--grad-accum`) with evaluations on the tiny Llama, on CUDA,
/// with `extra` flags and `env` variables; its stdout.
fn finetune(dir: &Path, out: &str, extra: &[&str], env: &[(&str, String)]) -> String {
    let (model, data) = (fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama"), chat_data(dir));
    let out = dir.join(out);
    let mut args = vec!["finetune", "--device", "cuda", "--max-steps", "4", "--max-seq-len", "64", "--no-packing"];
    if !extra.contains(&"--grad-accum") {
        args.extend(["--grad-accum", "4"]);
    }
    args.extend(["--eval-split", "0.2", "--eval-every", "2", "--lr", "1e-2"]);
    let paths = [("--model", model.as_path()), ("--data", data.as_path()), ("--out", out.as_path())];
    let bin = gpu_test_bin();
    let mut cmd = Command::new(bin);
    cmd.args(&args).args(extra).envs(env.iter().map(|(k, v)| (k, v)));
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    let run = cmd.output().expect("run qlora-rt");
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "qlora-rt {args:?} {extra:?} {env:?}:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

/// metrics.jsonl's rows without the wall-clock time.
fn metrics(out: &Path) -> Vec<Map<String, Value>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let row = |line: &str| {
        let mut row: Map<String, Value> = serde_json::from_str(line).unwrap();
        row.remove("elapsed");
        row
    };
    text.lines().map(row).collect()
}

/// The run in `got` is the run in `want`: the same rows and keys, counts and learning rates exact, losses and
/// gradient norms within [`REL`].
fn same_run(got: &Path, want: &Path) {
    let (got, want) = (metrics(got), metrics(want));
    assert_eq!(got.len(), want.len(), "rows of metrics.jsonl");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>(), "{g:?} vs {w:?}");
        for (key, wv) in w {
            let gv = &g[key];
            if matches!(key.as_str(), "loss" | "grad_norm" | "eval_loss") {
                let (a, b) = (gv.as_f64().unwrap(), wv.as_f64().unwrap());
                assert!((a - b).abs() <= REL * b.abs(), "{key} at step {}: {a} vs {b}", w["step"]);
            } else {
                assert_eq!(gv, wv, "{key} at step {}", w["step"]);
            }
        }
    }
}

#[test]
fn a_torchrun_group_of_one_trains_the_plain_run() {
    if gpu("a_torchrun_group_of_one_trains_the_plain_run").is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    finetune(dir.path(), "plain", &[], &[]);
    let stdout = finetune(dir.path(), "group", &[], &torchrun_group_of_one());
    assert!(stdout.contains("1 NCCL ranks"), "{stdout}");
    same_run(&dir.path().join("group"), &dir.path().join("plain"));
    // The base sharded across the group: each layer's NF4 bytes gathered on the GPU before it runs (device-only
    // weights put together from the gathered streams).
    let stdout = finetune(dir.path(), "sharded", &["--shard-base"], &torchrun_group_of_one());
    assert!(stdout.contains("the base sharded"), "{stdout}");
    same_run(&dir.path().join("sharded"), &dir.path().join("plain"));
}

#[test]
fn two_gpus_train_one_gpus_run() {
    let name = "two_gpus_train_one_gpus_run";
    let visible = qlora_runtime::device_count().unwrap_or(0);
    if visible < 2 {
        println!("qlora-gpu: {name}: skipped: {visible} GPU(s), two needed");
        return;
    }
    println!("qlora-gpu: {name}: ran on {visible} GPUs");
    // A hang fails in two minutes, not the default half hour.
    let timeout = [("QLORA_NCCL_TIMEOUT", "120".to_string())];
    let dir = tempfile::tempdir().unwrap();
    finetune(dir.path(), "one", &["--gpus", "1"], &timeout);
    let stdout = finetune(dir.path(), "two", &["--gpus", "2"], &timeout);
    assert!(stdout.contains("2 NCCL ranks"), "{stdout}");
    same_run(&dir.path().join("two"), &dir.path().join("one"));
    let stdout = finetune(dir.path(), "two-sharded", &["--gpus", "2", "--shard-base"], &timeout);
    assert!(stdout.contains("the base sharded"), "{stdout}");
    same_run(&dir.path().join("two-sharded"), &dir.path().join("one"));
    // Three micro-batches over two GPUs (rank 1 runs one more, sharded, and drops it), one layer parked in host
    // memory and the others recomputed: each rank's gathers in the same order whatever it computes.
    let uneven = ["--grad-accum", "3", "--park-layers", "1"];
    finetune(dir.path(), "one-uneven", &[&["--gpus", "1"][..], &uneven].concat(), &timeout);
    let stdout =
        finetune(dir.path(), "two-uneven", &[&["--gpus", "2", "--shard-base"][..], &uneven].concat(), &timeout);
    assert!(stdout.contains("the base sharded"), "{stdout}");
    same_run(&dir.path().join("two-uneven"), &dir.path().join("one-uneven"));
}
