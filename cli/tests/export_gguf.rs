//! `qlora-rt export-gguf` on the tiny fixture models: every type exports; the f16 file imported back
//! (`qlora-rt import`) gives the original's logits within 1e-2; `--adapter` writes exactly what exporting the
//! `qlora-rt merge` output writes; a .gguf `--model` keeps its tokenizer metadata; a bitsandbytes 4-bit folder
//! is dequantized; bad input fails in one stderr line with a non-zero status and leaves no file behind.

mod common;

use common::qlora_rt_cached;
use qlora_autograd::Tape;
use qlora_models::formats::bnb;
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::gguf::{GgufFile, HfImport};
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_runtime::DType;
use std::path::{Path, PathBuf};
use std::process::Output;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn ok(run: Output) -> String {
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    String::from_utf8_lossy(&run.stdout).into_owned()
}

fn export(model: &Path, out: &Path, ty: &str, extra: &[&str]) -> Output {
    let mut args =
        vec!["export-gguf", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--type", ty];
    args.extend(extra);
    qlora_rt_cached(&args, None)
}

fn logits(dir: &Path) -> Vec<f32> {
    let model = CausalLm::load(dir, BaseFormat::Dense(DType::F32)).unwrap();
    let ids: Vec<i32> = (0..24).map(|i| (i * 37 + 5) % model.config.vocab_size as i32).collect();
    let batch = Batch::pack(&[(ids.clone(), ids)]).unwrap();
    let tape = Tape::new();
    tape.no_grad(|| model.logits(&tape, &batch, 0)).unwrap().value().to_vec::<f32>()
}

#[test]
fn every_type_exports_and_f16_reimports_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["llama", "gemma", "gemma2", "gemma3"] {
        let model = fixtures().join("models").join(name);
        for ty in ["f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q4_1"] {
            let out = dir.path().join(format!("{name}-{ty}.gguf"));
            let stdout = ok(export(&model, &out, ty, &[]));
            assert!(stdout.contains("wrote") && stdout.contains("GGUF v3"), "{stdout}");
            GgufFile::open(&out).unwrap();
        }
        let back = dir.path().join(format!("{name}-back"));
        let gguf = dir.path().join(format!("{name}-f16.gguf"));
        ok(qlora_rt_cached(
            &["import", "--gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap(), "--dtype", "f32"],
            None,
        ));
        let (want, got) = (logits(&model), logits(&back));
        assert_eq!(want.len(), got.len());
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = want.iter().zip(&got).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-2 * scale, "{name}: max |Δlogit| {diff} vs max |logit| {scale}");
    }
    assert_no_hidden_entries(dir.path(), "no temporary left");
}

/// Export's temporaries (a partial file, the merged folder) are dot-named: none may be left in `dir`.
#[track_caller]
fn assert_no_hidden_entries(dir: &Path, what: &str) {
    let left: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(left.iter().all(|n| !n.starts_with('.')), "{what}: {left:?}");
}

#[test]
fn adapter_export_equals_exporting_the_merge() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/llama");
    let adapter = model.join("adapter");
    let direct = dir.path().join("direct.gguf");
    let stdout = ok(export(&model, &direct, "q8_0", &["--adapter", adapter.to_str().unwrap()]));
    assert!(stdout.contains("merged 14 adapted projection(s)"), "{stdout}");
    // Named like the model folder, so that general.name matches too.
    let merged = dir.path().join("m").join("llama");
    ok(common::merge(&model, &adapter, &merged, &[]));
    let via_merge = dir.path().join("via_merge.gguf");
    ok(export(&merged, &via_merge, "q8_0", &[]));
    assert_eq!(std::fs::read(&direct).unwrap(), std::fs::read(&via_merge).unwrap());
    let plain = dir.path().join("plain.gguf");
    ok(export(&model, &plain, "q8_0", &[]));
    assert_ne!(std::fs::read(&plain).unwrap(), std::fs::read(&direct).unwrap(), "the adapter changes the weights");
    assert_no_hidden_entries(dir.path(), "the merged folder is removed");
}

#[test]
fn a_gguf_model_keeps_its_tokenizer_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let original = fixtures().join("gguf/tiny_llama.gguf");
    let out = dir.path().join("again.gguf");
    let args = ["export-gguf", "--model", original.to_str().unwrap(), "--out", out.to_str().unwrap(), "--type", "q8_0"];
    ok(qlora_rt_cached(&args, Some(&cache)));
    let (a, b) = (GgufFile::open(&original).unwrap(), GgufFile::open(&out).unwrap());
    for key in [
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.chat_template",
        "llama.block_count",
        "llama.attention.head_count_kv",
        "llama.context_length",
    ] {
        assert_eq!(a.metadata().get(key), b.metadata().get(key), "{key}");
    }
    let names = |f: &GgufFile| {
        let mut n: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
        n.sort();
        n
    };
    assert_eq!(names(&a), names(&b));
    assert_eq!(b.get_str("general.name").unwrap(), Some("tiny_llama"));
}

#[test]
fn a_4bit_folder_is_dequantized() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("llama-dq");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("bnb/llama-dq").join(f), model.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("models/llama").join(f), model.join(f)).unwrap();
    }
    let out = dir.path().join("dq.gguf");
    ok(export(&model, &out, "f16", &[]));
    let file = GgufFile::open(&out).unwrap();
    let import = HfImport::new(&file, "float32").unwrap();
    let ck = Checkpoint::open(&model).unwrap();
    let v = import.tensors.iter().find(|t| t.name == "model.layers.1.self_attn.v_proj.weight").unwrap();
    let w = bnb::load_linear(&ck, "model.layers.1.self_attn.v_proj", [v.shape[0], v.shape[1]]).unwrap().unwrap();
    let want: Vec<f32> =
        w.dequantize(DType::F32).unwrap().to_vec::<f32>().iter().map(|x| half::f16::from_f32(*x).to_f32()).collect();
    assert_eq!(v.load(&file).unwrap(), want);
}

#[test]
fn bad_input_fails_in_one_line_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/llama");
    let fails = |args: &[&str], code: i32, needle: &str| {
        let run = qlora_rt_cached(args, None);
        assert_eq!(run.status.code(), Some(code), "{args:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("qlora-rt: ") && err.contains(needle), "{err}");
    };
    let out = dir.path().join("x.gguf");
    let (m, o) = (model.to_str().unwrap(), out.to_str().unwrap());
    fails(&["export-gguf", "--model", m, "--out", o, "--type", "q5_0"], 2, "invalid value 'q5_0' for '--type <TYPE>'");
    fails(&["export-gguf", "--model", "/no/such/model", "--out", o, "--type", "f16"], 1, "no such file or folder");
    fails(&["export-gguf", "--model", m, "--out", "/no/such/dir/x.gguf", "--type", "f16"], 1, "not an existing folder");
    let taken = dir.path().join("taken.gguf");
    std::fs::write(&taken, b"mine").unwrap();
    fails(&["export-gguf", "--model", m, "--out", taken.to_str().unwrap(), "--type", "f16"], 1, "exists");
    assert_eq!(std::fs::read(&taken).unwrap(), b"mine");

    // A model whose weights run out part way: the error comes while the file is being written.
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("models/gemma").join(f), broken.join(f)).unwrap();
    }
    let config = std::fs::read_to_string(fixtures().join("models/gemma/config.json")).unwrap();
    std::fs::write(
        broken.join("config.json"),
        config.replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false"),
    )
    .unwrap();
    fails(&["export-gguf", "--model", broken.to_str().unwrap(), "--out", o, "--type", "q8_0"], 1, "lm_head.weight");
    let mut left: Vec<String> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["broken", "taken.gguf"], "no output and no temporary file");
}
