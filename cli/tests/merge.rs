//! `qlora-rt merge` on the tiny Llama fixture and its peft adapter: the merged checkpoint must reproduce the
//! base + adapter forward (original weights with --from dense, NF4 weights with --from nf4), load pre-quantized
//! models, write the dtype asked for and a config transformers loads without bitsandbytes; bad input fails in
//! one line and leaves nothing behind. Also `.gguf` paths given as --model (imported once into the cache).

mod common;

use common::qlora_rt_cached;
use qlora_autograd::Tape;
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::peft::load_adapter;
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_runtime::DType;
use std::path::{Path, PathBuf};
use std::process::Output;

fn llama() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama")
}

fn tiny_gguf() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/tiny_llama.gguf")
}

fn merge(model: &Path, out: &Path, flags: &[&str]) -> Output {
    common::merge(model, &llama().join("adapter"), out, flags)
}

fn merged(model: &Path, out: &Path, flags: &[&str]) -> PathBuf {
    let run = merge(model, out, flags);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("merged 14 adapted"),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    out.to_path_buf()
}

fn logits(model: &CausalLm) -> Vec<f32> {
    let ids: Vec<i32> = (0..24).map(|i| (i * 37 + 5) % model.config.vocab_size as i32).collect();
    let batch = Batch::pack(&[(ids.clone(), ids)]).unwrap();
    let tape = Tape::new();
    tape.no_grad(|| model.logits(&tape, &batch, 0)).unwrap().value().to_vec::<f32>()
}

fn with_adapter(format: BaseFormat) -> Vec<f32> {
    let mut model = CausalLm::load(&llama(), format).unwrap();
    assert_eq!(load_adapter(&mut model, &llama().join("adapter")).unwrap(), 14);
    logits(&model)
}

/// max |a − b| / max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    diff / scale
}

#[test]
fn dense_merge_reproduces_base_plus_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out = merged(&llama(), &dir.path().join("m"), &["--dtype", "f32", "--from", "dense"]);
    let got = logits(&CausalLm::load(&out, BaseFormat::Dense(DType::F32)).unwrap());
    let want = with_adapter(BaseFormat::Dense(DType::F32));
    let base = logits(&CausalLm::load(&llama(), BaseFormat::Dense(DType::F32)).unwrap());
    assert!(rel_diff(&base, &want) > 1e-3, "the adapter must change the logits for this test to mean anything");
    let d = rel_diff(&got, &want);
    assert!(d < 1e-5, "merged vs base + adapter: {d}");
}

#[test]
fn nf4_merge_reproduces_the_qlora_forward_and_prequantized_models_merge() {
    let dir = tempfile::tempdir().unwrap();
    let out = merged(&llama(), &dir.path().join("m"), &["--dtype", "f32"]);
    let got = logits(&CausalLm::load(&out, BaseFormat::Dense(DType::F32)).unwrap());
    let want = with_adapter(BaseFormat::Nf4 { blocksize: 64, double_quant: true });
    let d = rel_diff(&got, &want);
    assert!(d < 1e-5, "merged vs NF4 base + adapter: {d}");
    let dense = with_adapter(BaseFormat::Dense(DType::F32));
    assert!(rel_diff(&got, &dense) > 1e-4, "--from nf4 must merge into the quantized weights");

    // A checkpoint saved 4-bit (no double quantization) merges as saved: the same tensors as quantizing on load.
    let q = dir.path().join("q");
    let run = qlora_rt_cached(&["quantize", "--model", llama().to_str().unwrap(), "--out", q.to_str().unwrap()], None);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let from_q = Checkpoint::open(&merged(&q, &dir.path().join("mq"), &["--dtype", "f32"])).unwrap();
    let direct =
        Checkpoint::open(&merged(&llama(), &dir.path().join("md"), &["--dtype", "f32", "--no-double-quant"])).unwrap();
    assert_eq!(from_q.names(), direct.names());
    assert!(!from_q.names().iter().any(|n| n.contains("absmax") || n.contains("quant")), "{:?}", from_q.names());
    for name in direct.names() {
        let (a, b) = (from_q.load(name).unwrap(), direct.load(name).unwrap());
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert_eq!(a.to_vec::<f32>(), b.to_vec::<f32>(), "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("mq/config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
}

#[test]
fn bf16_output_and_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = merged(&llama(), &dir.path().join("m"), &[]);
    let ck = Checkpoint::open(&out).unwrap();
    let source = Checkpoint::open(&llama()).unwrap();
    assert_eq!(ck.names(), source.names());
    for name in ck.names() {
        assert_eq!(ck.info(name).unwrap().0, "BF16", "{name}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert_eq!(config["dtype"], "bfloat16");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(llama().join(f)).unwrap(), "{f}");
    }
    // Loads and runs.
    assert!(logits(&CausalLm::load(&out, BaseFormat::Dense(DType::F32)).unwrap()).iter().all(|v| v.is_finite()));
}

#[test]
fn errors_are_one_line_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("x"), "x").unwrap();
    let run = merge(&llama(), &busy, &[]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.lines().count() == 1 && err.contains("not empty"), "{err}");

    // An adapter for another model (the Gemma fixture's shapes differ) fails in one line, leaving no folder.
    let out = dir.path().join("m");
    let gemma = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/gemma");
    let run = merge(&gemma, &out, &[]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.lines().count() == 1 && err.starts_with("qlora-rt: error:"), "{err}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("busy")], "nothing but the existing folder remains");

    let run = qlora_rt_cached(&["merge", "--model", llama().to_str().unwrap(), "--out", out.to_str().unwrap()], None);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.code() == Some(2) && err.lines().count() == 1 && err.contains("required"), "{err}");
}

#[test]
fn gguf_models_are_imported_once_into_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let gguf = tiny_gguf();
    let run = qlora_rt_cached(&["inspect", gguf.to_str().unwrap()], Some(cache.path()));
    let (out, err) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "{err}");
    assert!(err.contains("importing"), "{err}");
    assert!(out.contains("layers") || out.contains("Llama"), "{out}");
    let folders: Vec<_> = std::fs::read_dir(cache.path().join("gguf")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(folders.len(), 1, "{folders:?}");
    let name = folders[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("tiny_llama-54016-"), "{name}");
    assert!(folders[0].join("config.json").is_file() && folders[0].join("model.safetensors").is_file());
    // Imported losslessly: f32 weights, in a folder whose name says so (older bf16 imports are not reused).
    assert!(name.ends_with("-f32"), "{name}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folders[0].join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");

    // The second command reuses the import.
    let run = qlora_rt_cached(
        &["generate", "--model", gguf.to_str().unwrap(), "--prompt", "hello", "--max-new-tokens", "3"],
        Some(cache.path()),
    );
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(!err.contains("importing"), "{err}");
    assert_eq!(std::fs::read_dir(cache.path().join("gguf")).unwrap().count(), 1);

    // A missing .gguf fails in one line.
    let missing = cache.path().join("nope.gguf");
    let run = qlora_rt_cached(&["inspect", missing.to_str().unwrap()], Some(cache.path()));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.lines().count() == 1 && err.contains("nope.gguf"), "{err}");
}
