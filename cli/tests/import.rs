//! `qlora-rt import` on the GGUF fixtures of scripts/reference/gguf_fixtures.py: a tiny Llama (q/k rows permuted
//! by llama.cpp, seven tensor types, byte-level BPE) and a tiny Gemma 3 (norms stored as w + 1, SentencePiece
//! vocabulary). The imported folder must hold exactly the Hugging Face tensors the script computed, load as a
//! model, and tokenize as the reference tokenizers do; bad input must fail in one line and leave nothing behind.

mod common;

use common::qlora_rt;
use qlora_autograd::Tape;
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::tokenizer::Tokenizer;
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_runtime::DType;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf")
}

/// Imports fixture `name` into `dir/name` with extra flags; the import must succeed.
fn import(dir: &Path, name: &str, flags: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let gguf = fixtures().join(format!("{name}.gguf"));
    let mut args = vec!["import", "--gguf", gguf.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend(flags);
    let run = qlora_rt(&args);
    assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("wrote"), "{}", String::from_utf8_lossy(&run.stdout));
    out
}

fn reference(name: &str) -> Checkpoint {
    Checkpoint::from_files(&[fixtures().join(format!("{name}_ref.safetensors"))]).unwrap()
}

fn tokenizer_cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_cases.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = all[name].as_array().unwrap();
    let ids = |c: &serde_json::Value| c["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
    cases.iter().map(|c| (c["text"].as_str().unwrap().to_string(), ids(c))).collect()
}

#[test]
fn imports_match_the_reference_tensors_load_and_tokenize() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["tiny_llama", "tiny_gemma3"] {
        let out = import(dir.path(), name, &["--dtype", "f32"]);
        let (got, want) = (Checkpoint::open(&out).unwrap(), reference(name));
        assert_eq!(got.names(), want.names(), "{name}: tensor names");
        for t in want.names() {
            let (g, w) = (got.load(t).unwrap(), want.load(t).unwrap());
            assert_eq!((g.dtype(), g.shape()), (DType::F32, w.shape()), "{name}: {t}");
            let (g, w) = (g.to_vec::<f32>(), w.to_vec::<f32>());
            let same = g.iter().zip(&w).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{name}: {t} differs from the reference");
        }

        let tokenizer = Tokenizer::load(&out).unwrap();
        let cases = tokenizer_cases(name);
        for (text, ids) in &cases {
            assert_eq!(&tokenizer.encode(text, false).unwrap(), ids, "{name}: {text:?}");
            assert_eq!(&tokenizer.decode(ids, false).unwrap(), text, "{name}: decoding {text:?}");
        }

        let model = CausalLm::load(&out, BaseFormat::Dense(DType::F32)).unwrap();
        let ids: Vec<i32> = cases[0].1.iter().map(|&i| i as i32).collect();
        let batch = Batch::pack(&[(ids.clone(), ids.clone())]).unwrap();
        let tape = Tape::new();
        let logits = tape.no_grad(|| model.logits(&tape, &batch, 0)).unwrap().value().to_vec::<f32>();
        assert_eq!(logits.len(), ids.len() * model.config.vocab_size, "{name}");
        assert!(logits.iter().all(|v| v.is_finite()), "{name}: logits are finite");
    }
}

#[test]
fn default_import_writes_exact_f32_and_the_folder_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = import(dir.path(), "tiny_gemma3", &[]);
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    let expected =
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"];
    assert_eq!(files, expected);
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!((config["model_type"].as_str(), config["torch_dtype"].as_str()), (Some("gemma3_text"), Some("float32")));
    // Every value is the reference's (gguf-py's dequantization) to the bit: no rounding on the way.
    let (got, want) = (Checkpoint::open(&out).unwrap(), reference("tiny_gemma3"));
    for t in want.names() {
        assert_eq!(got.info(t).unwrap().0, "F32", "{t}");
        assert_eq!(got.bytes(t).unwrap(), want.bytes(t).unwrap(), "{t}");
    }
    // --dtype bf16 rounds matrices to nearest even, as the runtime converts, and keeps norms f32.
    let out = import(dir.path(), "tiny_llama", &["--dtype", "bf16"]);
    let (got, want) = (Checkpoint::open(&out).unwrap(), reference("tiny_llama"));
    for t in want.names() {
        let (dtype, shape) = got.info(t).unwrap();
        assert_eq!(dtype, if shape.len() == 1 { "F32" } else { "BF16" }, "{t}");
        let expect = want.load(t).unwrap().to_dtype(got.load(t).unwrap().dtype());
        assert_eq!(got.bytes(t).unwrap(), expect.to_bytes(), "{t}");
    }
    // No staging folder is left beside the outputs.
    let siblings = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(siblings, 2);
}

#[test]
fn refuses_a_non_empty_out_and_corrupt_files_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let one_line_error = |args: &[&str], needle: &str| {
        let run = qlora_rt(args);
        assert_eq!(run.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("qlora-rt: error: ") && err.contains(needle), "{err}");
    };
    let gguf = fixtures().join("tiny_llama.gguf");
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    one_line_error(&["import", "--gguf", gguf.to_str().unwrap(), "--out", busy.to_str().unwrap()], "not empty");
    assert_eq!(std::fs::read_to_string(busy.join("keep.txt")).unwrap(), "mine");

    let bytes = std::fs::read(&gguf).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("never");
    one_line_error(&["import", "--gguf", cut.to_str().unwrap(), "--out", out.to_str().unwrap()], "cut.gguf");
    one_line_error(&["import", "--gguf", cut.to_str().unwrap(), "--out", out.to_str().unwrap()], "truncated");
    let not_gguf = dir.path().join("model.safetensors");
    std::fs::write(&not_gguf, b"not a gguf file at all").unwrap();
    one_line_error(
        &["import", "--gguf", not_gguf.to_str().unwrap(), "--out", out.to_str().unwrap()],
        "not a GGUF file",
    );
    assert!(!out.exists(), "a failed import creates nothing");
    let left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.contains(".import-")), "{left:?}");
}
