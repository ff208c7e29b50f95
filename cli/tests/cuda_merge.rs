//! `qlora-rt merge --device cuda` against `--device cpu`, through the binary: the tiny Llama fixture with its peft
//! LoRA adapter and with a DoRA adapter trained for two steps on the CPU, merged from the NF4 and from the original
//! weights, in bf16 and f32. model.safetensors must be the same bytes whichever device computed it: the promise of
//! `--device` (the delta and DoRA's row norms are summed in one fixed order on both; every other step rounds once).
//!
//! Prints `qlora-gpu: <test>: ran on <gpu>` or `qlora-gpu: <test>: skipped: <why>`; a missing GPU passes unless
//! QLORA_REQUIRE_GPU=1. The binary is CARGO_BIN_EXE_qlora-cli, or QLORA_RT_BIN on another machine; the fixture comes
//! from CARGO_MANIFEST_DIR, or QLORA_FIXTURES.

mod common;

use common::{chat_data, gpu_test_bin};
use qlora_runtime::testing::{fixtures_dir, gpu};
use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) {
    let out = Command::new(gpu_test_bin()).args(args).output().expect("run qlora-rt");
    assert!(
        out.status.success(),
        "qlora-rt {}:\n{}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[test]
fn merge_on_cuda_writes_the_cpus_bytes() {
    let Some(_dev) = gpu("merge_on_cuda_writes_the_cpus_bytes") else { return };
    let model = fixtures_dir(env!("CARGO_MANIFEST_DIR")).join("models/llama");
    let dir = tempfile::tempdir().unwrap();
    let data = chat_data(dir.path());
    // Two steps move B off zero and the magnitudes off the weight norms, so every DoRA term counts.
    let dora = dir.path().join("dora");
    run(&[
        "finetune",
        "--model",
        path(&model),
        "--data",
        path(&data),
        "--out",
        path(&dora),
        "--dora",
        "--device",
        "cpu",
        "--max-steps",
        "2",
        "--max-seq-len",
        "64",
        "--micro-batch",
        "2",
        "--lr",
        "5e-2",
        "--warmup-steps",
        "0",
    ]);
    let lora = model.join("adapter");
    for (kind, adapter) in [("lora", &lora), ("dora", &dora)] {
        for flags in [
            ["--from", "nf4", "--dtype", "bf16"],
            ["--from", "nf4", "--dtype", "f32"],
            ["--from", "dense", "--dtype", "f32"],
        ] {
            let merged = |device: &str| {
                let out = dir.path().join(format!("{kind}-{}-{}-{device}", flags[1], flags[3]));
                let mut args = vec!["merge", "--model", path(&model), "--adapter", path(adapter), "--out", path(&out)];
                args.extend(flags);
                args.extend(["--device", device]);
                run(&args);
                std::fs::read(out.join("model.safetensors")).expect("merged weights")
            };
            let (cpu, cuda) = (merged("cpu"), merged("cuda"));
            let what = format!("{kind} {}", flags.join(" "));
            assert_eq!(cpu.len(), cuda.len(), "{what}: file sizes");
            let differ = cpu.iter().zip(&cuda).filter(|(a, b)| a != b).count();
            let first = cpu.iter().zip(&cuda).position(|(a, b)| a != b);
            assert_eq!(differ, 0, "{what}: {differ} of {} bytes differ, the first at {first:?}", cpu.len());
        }
    }
}
