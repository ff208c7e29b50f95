//! `qlora-rt inspect` on the tiny fixtures: a dense model, a sliding-window model, a PEFT adapter, and the same
//! model written 4-bit by `qlora-rt quantize`.

mod common;

use common::qlora_rt;
use qlora_models::formats::checkpoint::Checkpoint;
use std::path::{Path, PathBuf};

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(family)
}

fn inspect(dir: &Path) -> String {
    let out = qlora_rt(&["inspect", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The value after a report line's key.
fn field<'a>(report: &'a str, key: &str) -> &'a str {
    let line =
        report.lines().find(|l| l.split_whitespace().next() == Some(key)).unwrap_or_else(|| panic!("{key}: {report}"));
    line[key.len()..].trim()
}

fn elements(file: &Path) -> usize {
    let ck = Checkpoint::from_files(&[file.to_path_buf()]).unwrap();
    ck.names().iter().map(|n| ck.info(n).unwrap().1.iter().product::<usize>()).sum()
}

/// A report's grouped count ("1,234,567") as a number (the grouping itself is inspect.rs's unit test).
fn count(s: &str) -> usize {
    s.replace(',', "").parse().unwrap_or_else(|_| panic!("not a count: {s:?}"))
}

#[test]
fn dense_model_report() {
    let dir = fixture("llama");
    let report = inspect(&dir);
    assert_eq!(field(&report, "architecture"), "LlamaForCausalLM (Llama)");
    assert_eq!(field(&report, "layers"), "2 (full attention)");
    assert_eq!(field(&report, "attention"), "4 heads, 2 KV heads, head_dim 8");
    // Per layer q 32·32, k and v 16·32, o 32·32, gate/up/down 48·32.
    let linear = 2 * (1024 + 512 + 512 + 1024 + 3 * 1536);
    let total = elements(&dir.join("model.safetensors"));
    let params = field(&report, "parameters");
    let (t, rest) = params.split_once(" total: ").unwrap_or_else(|| panic!("{params}"));
    let (l, _) = rest.split_once(" linear").unwrap_or_else(|| panic!("{params}"));
    assert_eq!((count(t), count(l)), (total, linear), "{params}");
    assert!(params.contains("3,232 embeddings, 3,232 lm_head"), "{params}");
    assert_eq!(field(&report, "quantized"), "no");
    assert!(field(&report, "tensors").ends_with("F32 ×21"), "{report}");
    let bf16 = format!("bf16 {:.2} KiB", 2.0 * total as f64 / 1024.0);
    assert!(field(&report, "memory").contains(&bf16), "{report}");

    let report = inspect(&fixture("gemma2"));
    assert_eq!(field(&report, "layers"), "2 (1 sliding window 4, 1 full)");
    assert!(field(&report, "parameters").contains("0 lm_head (tied)"), "{report}");
}

#[test]
fn adapter_report() {
    let dir = fixture("llama").join("adapter");
    let report = inspect(&dir);
    assert_eq!(field(&report, "type"), "LoRA");
    assert!(field(&report, "rank").starts_with("r 4, alpha 8 (scaling 2)"), "{report}");
    assert_eq!(field(&report, "targets"), "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj (14 modules)");
    assert_eq!(field(&report, "tensors"), "28: F32 ×28");
    let params = elements(&dir.join("adapter_model.safetensors"));
    let trainable = field(&report, "trainable");
    assert_eq!(
        trainable.split_once(' ').map(|(n, unit)| (count(n), unit)),
        Some((params, "parameters")),
        "{trainable}"
    );
}

#[test]
fn four_bit_checkpoint_report() {
    let out_dir = tempfile::tempdir().unwrap();
    let q = out_dir.path().join("q");
    let src = fixture("llama");
    let made =
        qlora_rt(&["quantize", "--model", src.to_str().unwrap(), "--out", q.to_str().unwrap(), "--double-quant"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (dense, quant) = (inspect(&src), inspect(&q));
    assert_eq!(field(&quant, "parameters"), field(&dense, "parameters"), "4-bit weights count by their quant state");
    let quantized = field(&quant, "quantized");
    assert!(
        quantized.starts_with("bitsandbytes 4-bit nf4, double quant on")
            && quantized.ends_with("(14 linears stored 4-bit)")
    );
    assert!(field(&quant, "tensors").contains("NF4 ×14"), "{quant}");
    assert_eq!(field(&quant, "memory"), field(&dense, "memory"));
}

#[test]
fn neither_model_nor_adapter_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = qlora_rt(&["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("neither a model folder"), "{err}");
}
