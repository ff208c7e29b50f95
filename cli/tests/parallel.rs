//! Data-parallel finetune over the in-process group (`--ranks N`, threads on the CPU): N ranks train the single
//! process's run bit for bit (losses, gradient norms, evaluation, checkpoints, adapter), a checkpoint resumes with
//! another number of ranks, and launches across processes (`--gpus N`, torchrun), which need GPUs and NCCL, fail in
//! one clear line where there are none.

mod common;

use common::{interrupt_after_three_steps, one_line_error, qlora_rt};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/llama");

/// Six training rows of uneven length (two held out) in words the fixture tokenizer knows.
fn data(dir: &Path) -> PathBuf {
    let answers = ["42.", "the answer is 42.", "she sells sea shells on the sea shore, the answer is 42.", "hello!"];
    let rows: Vec<String> = (0..8)
        .map(|i| {
            let messages = [("user", "what is the answer?"), ("assistant", answers[i % 4])];
            let messages: Vec<Value> =
                messages.iter().map(|(r, c)| serde_json::json!({"role": r, "content": c})).collect();
            serde_json::json!({ "messages": messages }).to_string()
        })
        .collect();
    let path = dir.join("data.jsonl");
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

/// Steps of four micro-batches, then of two at each epoch's end (six rows, one per micro-batch): three ranks take
/// 2/1/1 and then 1/1/0. Dropout stays on and the learning rate warms up and decays, so every rank must draw the
/// single process's dropout streams for its micro-batches and apply the same update.
fn finetune(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut a = vec!["finetune", "--model", MODEL, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    a.extend(["--max-steps", "6", "--max-seq-len", "64", "--lr", "1e-2", "--warmup-steps", "2", "--no-packing"]);
    a.extend([
        "--grad-accum",
        "4",
        "--eval-split",
        "0.25",
        "--eval-every",
        "3",
        "--save-every",
        "3",
        "--device",
        "cpu",
    ]);
    a.extend(extra);
    let run = qlora_rt(&a);
    assert!(run.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&run.stderr));
    run
}

/// metrics.jsonl without the wall-clock times, floats as bits.
fn metrics(out: &Path) -> Vec<Vec<(String, String)>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|line| {
            let row: serde_json::Map<String, Value> = serde_json::from_str(line).unwrap();
            let bits = |v: &Value| v.as_f64().map_or(v.to_string(), |f| format!("{:016x}", f.to_bits()));
            row.iter().filter(|(k, _)| *k != "elapsed").map(|(k, v)| (k.clone(), bits(v))).collect()
        })
        .collect()
}

fn bytes(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The files a run leaves that must match: the adapter and each checkpoint's adapter and optimizer state.
fn files(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec!["adapter_model.safetensors".to_string()];
    for step in [3, 6] {
        for f in ["adapter_model.safetensors", "optimizer.safetensors"] {
            names.push(format!("checkpoint-{step}/{f}"));
        }
    }
    names.into_iter().map(|n| (n.clone(), bytes(out.join(&n)))).collect()
}

/// N ranks against one process, plain LoRA at N = 2 and 3 and DoRA (its magnitude vectors too) at N = 2, each also
/// with the base sharded across the ranks (`--shard-base`: with three ranks the last step's third rank has no
/// micro-batch of its own, and DoRA's magnitudes start from gathered layers).
#[test]
fn ranks_train_the_single_process_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let lora: &[(&str, &[&str])] = &[("2", &[]), ("3", &[]), ("3", &["--shard-base"])];
    let dora: &[(&str, &[&str])] = &[("2", &[]), ("2", &["--shard-base"])];
    for (kind, extra, runs) in [("lora", &[][..], lora), ("dora", &["--dora"][..], dora)] {
        let alone = dir.path().join(format!("{kind}-alone"));
        finetune(&data, &alone, extra);
        let (want_metrics, want_files) = (metrics(&alone), files(&alone));
        assert_eq!(want_metrics.len(), 6 + 2, "six steps and two evaluations");
        for (n, shard) in runs {
            let how = format!("{kind} --ranks {n} {}", shard.join(" "));
            let out = dir.path().join(how.replace(' ', "_"));
            let run = finetune(&data, &out, &[extra, &["--ranks", n], shard].concat());
            let stdout = String::from_utf8_lossy(&run.stdout);
            assert!(stdout.contains(&format!("{n} in-process ranks")), "{stdout}");
            assert_eq!(stdout.contains("the base sharded"), !shard.is_empty(), "{stdout}");
            assert_eq!(stdout.matches("adapter, tokenizer files").count(), 1, "rank 0 alone writes: {stdout}");
            let got = metrics(&out);
            assert!(got == want_metrics, "{how}: metrics differ:\n{got:?}\n{want_metrics:?}");
            for ((name, got), (_, want)) in files(&out).iter().zip(&want_files) {
                assert!(got == want, "{how}: {name} differs from the single process's");
            }
        }
    }
}

/// A checkpoint holds no trace of how many ranks wrote it, or whether they sharded the base: a single process's
/// resumes on three ranks, sharded or not, and ends with the same adapter.
#[test]
fn a_checkpoint_resumes_with_another_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let alone = dir.path().join("alone");
    finetune(&data, &alone, &[]);
    let checkpoint = alone.join("checkpoint-3");
    let adapter = |d: &Path| bytes(d.join("adapter_model.safetensors"));
    for (name, shard) in [("resumed", &[][..]), ("resumed-sharded", &["--shard-base"][..])] {
        let resumed = dir.path().join(name);
        let run =
            finetune(&data, &resumed, &[&["--ranks", "3", "--resume", checkpoint.to_str().unwrap()], shard].concat());
        assert_eq!(String::from_utf8_lossy(&run.stdout).matches("resuming at step 3").count(), 1);
        assert!(adapter(&alone) == adapter(&resumed), "{name}: the resumed adapter differs");
    }
}

fn finetune_args(extra: &[&'static str]) -> Vec<&'static str> {
    let mut a = vec!["finetune", "--model", MODEL, "--data", "unused.jsonl", "--out", "unused-out"];
    a.extend(extra);
    a
}

/// Launches across processes need GPUs: on a machine without them (CI), each way in fails in one line that says why;
/// a torchrun environment that is wrong is named too.
#[test]
fn launches_across_processes_need_gpus_and_say_so_in_one_line() {
    let e = one_line_error(&finetune_args(&["--gpus", "2", "--device", "cpu"]));
    assert!(e.contains("--gpus 2: training across processes runs on GPUs through NCCL; --device cpu cannot"), "{e}");
    let e = one_line_error(&finetune_args(&["--gpus", "0"]));
    assert!(e.contains("--gpus must be at least 1"), "{e}");
    let e = one_line_error(&finetune_args(&["--ranks", "0"]));
    assert!(e.contains("--ranks must be at least 1"), "{e}");
    let e = one_line_error(&finetune_args(&["--ranks", "2", "--device", "cuda"]));
    assert!(e.contains("--ranks runs in-process ranks on the CPU only"), "{e}");
    let e = one_line_error(&finetune_args(&["--shard-base", "--quantize", "none"]));
    assert!(e.contains("--shard-base shards an NF4 base (QLoRA)"), "{e}");
    let e = one_line_error(&finetune_args(&["--shard-base", "--device", "cpu"]));
    assert!(e.contains("--shard-base splits the base across GPUs: train on several"), "{e}");
    if qlora_runtime::device_count().unwrap_or(0) < 2 {
        // Before any rank is launched: too few GPUs (or no driver) is this process's one error line.
        let e = one_line_error(&finetune_args(&["--gpus", "2"]));
        assert!(e.starts_with("qlora-rt: error: --gpus 2: "), "{e}");
    }

    let under = |extra: &[&'static str], vars: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora-cli"));
        cmd.args(finetune_args(extra)).envs(vars.iter().copied());
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!((out.status.code(), err.trim_end().lines().count()), (Some(1), 1), "{vars:?}: {err}");
        err
    };
    let torchrun = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let e = under(&["--device", "cpu"], &torchrun);
    assert!(e.contains("WORLD_SIZE=2 (rank 1): training across processes runs on GPUs through NCCL"), "{e}");
    if qlora_runtime::device_count().unwrap_or(0) < 2 {
        let e = under(&[], &torchrun);
        assert!(e.contains("WORLD_SIZE=2 (rank 1) trains on cuda:1: "), "{e}");
    }
    let e = under(&["--device", "cpu"], &[("RANK", "2"), ("WORLD_SIZE", "2")]);
    assert!(e.contains("torchrun environment: RANK=2 is not below WORLD_SIZE=2"), "{e}");
}

/// Ctrl-C reaches rank 0, and the whole group stops after the same step: one checkpoint, one message, status 130.
#[test]
fn ctrl_c_stops_every_rank_after_the_same_step() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (data(dir.path()), dir.path().join("out"));
    let mut a = vec!["finetune", "--model", MODEL, "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()];
    a.extend(["--max-steps", "100000", "--max-seq-len", "64", "--save-every", "0", "--device", "cpu", "--ranks", "2"]);
    let done = interrupt_after_three_steps(&a, &out);
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(130), "{err}");
    assert_eq!(err.matches("stopped at step").count(), 1, "{err}");
    let steps = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count();
    assert!(out.join(format!("checkpoint-{steps}/trainer_state.json")).is_file(), "{err}");
}

/// A diverging loss stops every rank before the update, with the single process's one error line.
#[test]
fn a_diverging_loss_stops_the_group_with_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = data(dir.path());
    let diverge = |ranks: &str| {
        let out = dir.path().join(format!("ranks-{ranks}"));
        let run = qlora_rt(&[
            "finetune",
            "--model",
            MODEL,
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "10",
            "--max-seq-len",
            "64",
            "--lr",
            "1e30",
            "--save-every",
            "1",
            "--device",
            "cpu",
            "--ranks",
            ranks,
        ]);
        let err = String::from_utf8_lossy(&run.stderr).replace(out.to_str().unwrap(), "OUT");
        assert_eq!((run.status.code(), err.trim_end().lines().count()), (Some(1), 1), "{err}");
        err
    };
    let alone = diverge("1");
    assert!(alone.contains("stopped before updating the adapter") && alone.contains("OUT/checkpoint-"), "{alone}");
    assert_eq!(diverge("3"), alone);
}
