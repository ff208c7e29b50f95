//! GGUF export round trips on the tiny Llama / Gemma / Gemma 2 / Gemma 3 checkpoints of tests/fixtures/models:
//! each is written as every file type (F16, Q8_0, Q4_0, Q4_1, Q4_K_M, Q5_K_M, Q6_K), read back with the GGUF reader and imported. The stored bytes
//! must be exactly our quantizer's output for the transformed weights, the imported values our dequantizer's
//! reading of them (and within the type's error bound of the original), the config and tokenizer the original's.
//! Also: the quantizers against gguf-py's bytes (tests/fixtures/gguf/quantize_ref.safetensors) and ggml's own
//! K-quant bytes (tests/fixtures/gguf/kquant_ref.safetensors).

use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::gguf::export::export;
use qlora_models::formats::gguf::ftype::{FileType, MixModel};
use qlora_models::formats::gguf::quant::{quantize, QUANTIZABLE};
use qlora_models::formats::gguf::{dequantize, GgmlType, GgufFile, HfImport, Hyper, MetaArray, MetaValue};
use qlora_models::formats::tokenizer::Tokenizer;
use qlora_models::ModelConfig;
use qlora_runtime::DType;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

const TYPES: [FileType; 7] =
    [FileType::F16, FileType::Q8_0, FileType::Q4_0, FileType::Q4_1, FileType::Q4_K_M, FileType::Q5_K_M, FileType::Q6_K];

/// Largest error of one value after quantizing a block whose largest magnitude is `amax`: half a step, plus the
/// f16 rounding of the scale and minimum. Q4_0's (Q5_0's) levels run from −8d (−16d) up with the block's extreme
/// at the bottom, so a value at the opposite extreme is clamped a whole step away. K-quants quantize their group
/// scales too: a step of the super-block's widest group.
fn bound(ty: GgmlType, amax: f32) -> f32 {
    let max_err = match ty {
        GgmlType::Q8_0 => 0.5 / 127.0,
        GgmlType::Q4_0 => 1.0 / 8.0,
        GgmlType::Q4_1 => 1.0 / 15.0,
        GgmlType::Q5_0 => 1.0 / 16.0,
        GgmlType::Q5_1 => 1.0 / 31.0,
        GgmlType::Q4_K => 2.0 / 15.0,
        GgmlType::Q5_K => 2.0 / 31.0,
        GgmlType::Q6_K => 2.0 / 63.0,
        _ => 0.0,
    };
    amax * (max_err + 2e-3) + 1e-7
}

fn check_model(name: &str) {
    let dir = fixtures().join("models").join(name);
    let original = ModelConfig::load(&dir).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let hp = Hyper::from_config(&original);
    let tmp = tempfile::tempdir().unwrap();
    let mix = MixModel { layers: original.num_hidden_layers, tied: original.tie_word_embeddings, llama_70b: false };
    for ft in TYPES {
        let out = tmp.path().join(format!("{name}-{ft:?}.gguf"));
        let summary = export(&dir, &out, ft, name).unwrap();
        let file = GgufFile::open(&out).unwrap();
        assert_eq!((file.version(), summary.tensors), (3, file.tensors().len()), "{name}");
        let import = HfImport::new(&file, "float32").unwrap();

        // Tensors: stored bytes, imported values, error against the original.
        let plan = hp.export_plan();
        assert_eq!(plan.len(), file.tensors().len(), "{name}: no other tensor is written");
        assert_eq!(file.tensor("output.weight").is_none(), original.tie_word_embeddings, "{name}");
        for t in &plan {
            let info = file.tensor(&t.gguf).unwrap_or_else(|| panic!("{name}: {} missing", t.gguf));
            let w = ck.load(&t.hf).unwrap().to_dtype(DType::F32).to_vec::<f32>();
            let want_ty = ft.tensor_type(&mix, &t.gguf, &t.shape);
            assert_eq!(info.ty, want_ty, "{name}: {}", t.gguf);
            let transformed = t.apply(w.clone());
            let stored = match want_ty {
                GgmlType::F32 => transformed.iter().flat_map(|v| v.to_le_bytes()).collect(),
                q => quantize(q, &transformed).unwrap(),
            };
            assert_eq!(file.tensor_bytes(info), &stored[..], "{name} {ft:?}: {}", t.gguf);

            let back = import.tensors.iter().find(|h| h.source == t.gguf).unwrap();
            assert_eq!(back.name, t.hf, "{name}: {} imports under its own name", t.gguf);
            let got = back.load(&file).unwrap();
            let mut deq = vec![0.0; w.len()];
            dequantize(want_ty, &stored, &mut deq).unwrap();
            match want_ty {
                // Norms: (w + 1) − 1 in f32 for Gemma, w itself for Llama.
                GgmlType::F32 => {
                    for (g, o) in got.iter().zip(&w) {
                        assert!((g - o).abs() <= 1e-6, "{name}: {} {g} vs {o}", t.hf);
                    }
                }
                GgmlType::F16 => {
                    let rounded: Vec<f32> = w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
                    assert_eq!(got, rounded, "{name}: {} is the f16 rounding of the weights", t.hf);
                }
                q => {
                    // Each stored block's values are within the bound of that block's originals.
                    let n = q.block_size();
                    for (b, (d, x)) in deq.chunks(n).zip(transformed.chunks(n)).enumerate() {
                        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        for (dv, xv) in d.iter().zip(x) {
                            assert!((dv - xv).abs() <= bound(q, amax), "{name} {}: {} block {b}", q.name(), t.hf);
                        }
                    }
                    // Imported values are the dequantized ones with the transform undone.
                    assert_eq!(t.apply(got.clone()), deq, "{name}: {}", t.hf);
                }
            }
        }

        // Config: every field the runtime reads comes back.
        let back = ModelConfig::parse(&import.config.to_string(), Path::new("config.json")).unwrap();
        assert_eq!(back, original, "{name} {ft:?}: config");

        // Tokenizer: the imported files encode and decode as the original.
        let tok_dir = tmp.path().join(format!("{name}-{ft:?}-tok"));
        std::fs::create_dir(&tok_dir).unwrap();
        std::fs::write(tok_dir.join("tokenizer.json"), import.tokenizer.to_string()).unwrap();
        std::fs::write(tok_dir.join("tokenizer_config.json"), import.tokenizer_config.to_string()).unwrap();
        let (a, b) = (Tokenizer::load(&dir).unwrap(), Tokenizer::load(&tok_dir).unwrap());
        for text in ["hello world", "the cat sat on the mat.", "<|im_start|>user\nhi there<|im_end|>\n", "1, 2: 3?"] {
            for special in [false, true] {
                let ids = a.encode(text, special).unwrap();
                assert_eq!(b.encode(text, special).unwrap(), ids, "{name}: {text:?} (special tokens {special})");
                assert_eq!(b.decode(&ids, false).unwrap(), a.decode(&ids, false).unwrap(), "{name}: {text:?}");
            }
        }
        assert_eq!((a.bos.clone(), a.eos.clone(), a.pad.clone()), (b.bos.clone(), b.eos.clone(), b.pad.clone()));
        assert_eq!(a.chat_template, b.chat_template, "{name}");
        assert_eq!(file.get_str("tokenizer.ggml.model").unwrap(), Some("llama"));
    }
}

#[test]
fn tiny_llama_round_trips() {
    check_model("llama");
}

#[test]
fn tiny_gemma_round_trips() {
    check_model("gemma");
}

#[test]
fn tiny_gemma2_round_trips() {
    check_model("gemma2");
}

#[test]
fn tiny_gemma3_round_trips() {
    check_model("gemma3");
}

#[test]
fn metadata_keys_are_llama_cpps() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("g3.gguf");
    export(&fixtures().join("models/gemma3"), &out, FileType::Q8_0, "tiny").unwrap();
    let f = GgufFile::open(&out).unwrap();
    let md = f.metadata();
    let u = |k: &str| md[k].as_u64().unwrap_or_else(|| panic!("{k}"));
    assert_eq!(md["general.architecture"], MetaValue::Str("gemma3".into()));
    assert_eq!(md["general.name"], MetaValue::Str("tiny".into()));
    assert_eq!((u("general.alignment"), u("general.file_type"), u("general.quantization_version")), (32, 7, 2));
    assert_eq!((u("gemma3.context_length"), u("gemma3.embedding_length"), u("gemma3.block_count")), (64, 32, 3));
    assert_eq!((u("gemma3.attention.head_count"), u("gemma3.attention.head_count_kv")), (4, 2));
    assert_eq!((u("gemma3.attention.key_length"), u("gemma3.attention.value_length")), (16, 16));
    assert_eq!((u("gemma3.feed_forward_length"), u("gemma3.attention.sliding_window")), (48, 4));
    assert_eq!(md["gemma3.rope.freq_base"], MetaValue::F32(1e6));
    assert_eq!(md["gemma3.attention.layer_norm_rms_epsilon"], MetaValue::F32(1e-6));
    assert_eq!(
        md["gemma3.attention.sliding_window_pattern"],
        MetaValue::Array(MetaArray::Bool(vec![true, true, false]))
    );
    assert_eq!(md["tokenizer.ggml.add_bos_token"], MetaValue::Bool(true));
    assert_eq!(md["tokenizer.ggml.add_space_prefix"], MetaValue::Bool(true));
    assert_eq!((u("tokenizer.ggml.bos_token_id"), u("tokenizer.ggml.eos_token_id")), (1, 2));
    assert_eq!((u("tokenizer.ggml.padding_token_id"), u("tokenizer.ggml.unknown_token_id")), (0, 3));
    // Offsets are aligned and the data section starts aligned.
    assert!(f.tensors().iter().all(|t| t.offset % 32 == 0));
    let out = tmp.path().join("llama.gguf");
    export(&fixtures().join("models/llama"), &out, FileType::F16, "tiny").unwrap();
    let f = GgufFile::open(&out).unwrap();
    let md = f.metadata();
    assert_eq!((md["llama.rope.dimension_count"].as_u64(), md["llama.vocab_size"].as_u64()), (Some(8), Some(101)));
    assert!(!md.contains_key("llama.attention.key_length"), "head_dim = hidden / heads is implied");
    assert!(f.tensor("output.weight").is_some(), "untied head");

    // general.name comes from config.json's _name_or_path (as `import` writes it) when there is one.
    let named = tmp.path().join("named");
    std::fs::create_dir(&named).unwrap();
    let src = fixtures().join("models/llama");
    for file in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(file), named.join(file)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct".into();
    std::fs::write(named.join("config.json"), config.to_string()).unwrap();
    let out = tmp.path().join("named.gguf");
    export(&named, &out, FileType::Q4_K_M, "folder").unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.get_str("general.name").unwrap(), Some("SmolLM2-135M-Instruct"));
    assert_eq!(f.metadata()["general.file_type"].as_u64(), Some(15));
}

/// gguf-py 0.19.0's numpy quantizers on rows of random values (scripts/reference/gguf_quantize_ref.py): our
/// quantizer must produce the same bytes for every row.
#[test]
fn quantizers_match_gguf_py_bit_for_bit() {
    let ck = Checkpoint::from_files(&[fixtures().join("gguf/quantize_ref.safetensors")]).unwrap();
    let input = ck.load("input").unwrap();
    let shape = input.shape().to_vec();
    let input = input.to_vec::<f32>();
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::F16] {
        let want = ck.bytes(ty.name()).unwrap();
        let got = quantize(ty, &input).unwrap();
        assert_eq!(got.len(), want.len(), "{}", ty.name());
        let row_bytes = got.len() / shape[0];
        for (r, (g, w)) in got.chunks(row_bytes).zip(want.chunks(row_bytes)).enumerate() {
            assert_eq!(g, w, "{}: row {r} differs from gguf-py", ty.name());
        }
    }
}

/// ggml's own `quantize_row_<type>_ref` (what llama-quantize runs without an importance matrix) on rows of 256
/// values (scripts/llamacpp/kquant_ref.py): our quantizer must produce the same bytes for every row and type.
#[test]
fn quantizers_match_ggml_bit_for_bit() {
    let ck = Checkpoint::from_files(&[fixtures().join("gguf/kquant_ref.safetensors")]).unwrap();
    let input = ck.load("input").unwrap();
    let rows = input.shape()[0];
    let input = input.to_vec::<f32>();
    // Every block type we write (F32/F16 are conversions, held to the bit elsewhere).
    for ty in QUANTIZABLE.into_iter().filter(|t| t.block_size() > 1) {
        let want = ck.bytes(ty.name()).unwrap();
        let got = quantize(ty, &input).unwrap();
        assert_eq!(got.len(), want.len(), "{}", ty.name());
        let row_bytes = got.len() / rows;
        for (r, (g, w)) in got.chunks(row_bytes).zip(want.chunks(row_bytes)).enumerate() {
            assert_eq!(g, w, "{}: row {r} differs from ggml", ty.name());
        }
    }
}
