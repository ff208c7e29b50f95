use super::write::linear_parts;
use super::*;
use crate::formats::checkpoint::Checkpoint;
use crate::transformer::{BaseFormat, CausalLm};
use qlora_runtime::nf4;
use qlora_runtime::quant::{Absmax, BaseWeight, Nf4Weight};
use qlora_runtime::Rng;
use qlora_runtime::{DType, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;
use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// (name, dtype, shape, bytes) of a tensor to store.
type Stored = (String, Dtype, Vec<usize>, Vec<u8>);

fn stored(name: &str, t: &Tensor) -> Stored {
    let (dtype, bytes) = match t.dtype() {
        DType::F32 => (Dtype::F32, bytemuck::cast_slice(&t.values::<f32>()).to_vec()),
        DType::BF16 => (Dtype::BF16, bytemuck::cast_slice(&t.values::<half::bf16>()).to_vec()),
        other => panic!("test tensors are f32 or bf16, not {other:?}"),
    };
    (name.into(), dtype, t.shape().to_vec(), bytes)
}

/// The bytes safetensors' own serializer writes for these tensors, with transformers' metadata.
fn serialize(tensors: &[Stored]) -> Vec<u8> {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).expect("consistent test tensor")))
        .collect();
    safetensors::serialize(views, Some(HashMap::from([("format".into(), "pt".into())]))).unwrap()
}

fn checkpoint(dir: &Path, tensors: &[Stored]) -> Checkpoint {
    let path = dir.join("model.safetensors");
    std::fs::write(&path, serialize(tensors)).unwrap();
    Checkpoint::from_files(&[path]).unwrap()
}

const OPTS: QuantizeOptions = QuantizeOptions { blocksize: 64, double_quant: true, compute_dtype: DType::F32 };

#[test]
fn py_float_is_python_repr() {
    // An f32 offset widened, as `offset.item()` gives it to json.dumps.
    let f32_offset = f32::from_bits(0x3f06_7b36) as f64;
    for (v, py) in [
        (0.0, "0.0"),
        (-0.0, "-0.0"),
        (1.0, "1.0"),
        (0.1, "0.1"),
        (1e-6, "1e-06"),
        (1e-4, "0.0001"),
        (1e-5, "1e-05"),
        (1e16, "1e+16"),
        (1e15, "1000000000000000.0"),
        (123456789.5, "123456789.5"),
        (1.5e-7, "1.5e-07"),
        (2.5e100, "2.5e+100"),
        (-3.25, "-3.25"),
        (10000.0, "10000.0"),
        (5e-324, "5e-324"),
        (f64::MAX, "1.7976931348623157e+308"),
        (0.00012345, "0.00012345"),
        (12345678901234567.0, "1.2345678901234568e+16"),
        (f32_offset, "0.5253175497055054"),
        (f64::NAN, "NaN"),
        (f64::NEG_INFINITY, "-Infinity"),
    ] {
        assert_eq!(py_float(v), py, "{v:e}");
    }
}

#[test]
fn pretty_json_is_json_dumps_indent_2_sort_keys() {
    let v: Value = serde_json::from_str(
        r#"{"b":[1,2.5,{"z":null,"a":true}],"a":"é☃😀\"\\\n\u0001\u007f","e":[],"d":{},"c":1e-06,"n":-7}"#,
    )
    .unwrap();
    // Python 3: json.dumps(v, indent=2, sort_keys=True) of the same object.
    let python = r#"{
  "a": "\u00e9\u2603\ud83d\ude00\"\\\n\u0001\u007f",
  "b": [
    1,
    2.5,
    {
      "a": true,
      "z": null
    }
  ],
  "c": 1e-06,
  "d": {},
  "e": [],
  "n": -7
}"#;
    assert_eq!(py_json_pretty(&v), python);
}

#[test]
fn quant_state_json_is_what_bnb_writes() {
    let state = QuantState {
        blocksize: 64,
        dtype: DType::F32,
        shape: vec![96, 96],
        nested_offset: Some(f32::from_bits(0x3f06_7b36)),
    };
    let json = state.to_json();
    assert_eq!(
        json,
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [96, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5253175497055054}"#
    );
    assert_eq!(QuantState::parse(json.as_bytes()).unwrap(), state);
    let plain = QuantState { blocksize: 128, dtype: DType::BF16, shape: vec![8, 4], nested_offset: None };
    assert_eq!(plain.to_json(), r#"{"quant_type": "nf4", "blocksize": 128, "dtype": "bfloat16", "shape": [8, 4]}"#);
    assert_eq!(QuantState::parse(plain.to_json().as_bytes()).unwrap(), plain);
}

#[test]
fn quant_state_json_errors_say_what_is_wrong() {
    let good = r#""quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2, 64]"#;
    for (json, expected) in [
        ("{\"quant_type\": ".to_string(), "malformed"),
        ("[1, 2]".into(), "not an object"),
        (format!("{{{good}, \"extra\": 1}}"), "unknown key \"extra\""),
        (format!("{{{}}}", good.replace("\"nf4\"", "\"fp4\"")), "fp4\" is not supported"),
        (format!("{{{}}}", good.replace("64,", "48,")), "blocksize 48 is not a power of two"),
        (format!("{{{}}}", good.replace("float16", "int8")), "dtype \"int8\""),
        (format!("{{{}}}", good.replace("[2, 64]", "null")), "\"shape\" missing"),
        (format!("{{{good}, \"nested_offset\": 0.5}}"), "some but not all"),
        (
            format!("{{{good}, \"nested_blocksize\": 128, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}}"),
            "nested_blocksize 128",
        ),
    ] {
        let err = QuantState::parse(json.as_bytes()).unwrap_err();
        assert!(err.contains(expected), "{json}: {err}");
    }
}

/// A small Llama-named checkpoint: bf16 embeddings, f32 norms, and linears of awkward sizes (a partial last
/// block, an odd element count) in f32 and bf16.
fn source_tensors() -> Vec<Stored> {
    let mut rng = Rng::new(7);
    let mut t = |shape: &[usize], dtype| Tensor::randn(shape, 0.05, dtype, &mut rng);
    vec![
        stored("model.embed_tokens.weight", &t(&[11, 64], DType::BF16)),
        stored("model.layers.0.input_layernorm.weight", &t(&[64], DType::F32)),
        stored("model.layers.0.self_attn.q_proj.weight", &t(&[64, 64], DType::F32)),
        stored("model.layers.0.self_attn.k_proj.weight", &t(&[33, 64], DType::BF16)),
        stored("model.layers.0.mlp.down_proj.weight", &t(&[3, 7], DType::F32)),
        stored("model.layers.12.mlp.up_proj.weight", &t(&[130, 129], DType::F32)),
        stored("lm_head.weight", &t(&[11, 64], DType::F32)),
    ]
}

#[test]
fn streamed_file_is_safetensors_own_serialization_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let source = source_tensors();
    let src = checkpoint(dir.path(), &source);
    for (double_quant, blocksize) in [(false, 64), (true, 64), (true, 128), (false, 32)] {
        let opts = QuantizeOptions { blocksize, double_quant, ..OPTS };
        let mut expected: Vec<Stored> = Vec::new();
        let mut weights = Vec::new();
        for (name, ..) in &source {
            if is_decoder_linear(name) {
                let w = Nf4Weight::quantize(&src.load(name).unwrap(), blocksize, double_quant).unwrap();
                expected.extend(linear_parts(name, &w).into_iter().map(|p| (p.name, p.dtype, p.shape, p.data)));
                weights.push((name.strip_suffix(".weight").unwrap().to_string(), w));
            } else {
                expected.push(source.iter().find(|s| &s.0 == name).unwrap().clone());
            }
        }
        let mut out = Cursor::new(Vec::new());
        let summary = write_quantized(&src, opts, &mut out, Path::new("out")).unwrap();
        assert!(out.get_ref() == &serialize(&expected), "dq {double_quant}, block {blocksize}: bytes differ");
        assert_eq!((summary.tensors, summary.linears), (expected.len(), 4));
        assert_eq!(summary.params, 64 * 64 + 33 * 64 + 3 * 7 + 130 * 129);
        assert_eq!(summary.quantized_bytes, weights.iter().map(|(_, w)| w.size_in_bytes()).sum::<usize>());

        let qdir = tempfile::tempdir().unwrap();
        std::fs::write(qdir.path().join("model.safetensors"), out.into_inner()).unwrap();
        let ck = Checkpoint::open(qdir.path()).unwrap();
        for (module, w) in &weights {
            assert_eq!(load_linear(&ck, module, w.shape).unwrap().as_ref(), Some(w), "{module}");
        }
        assert!(load_linear(&src, "model.layers.0.self_attn.q_proj", [64, 64]).unwrap().is_none());
    }
}

/// One double-quantized linear `m.weight` [4, 64] as bnb stores it, for damaging.
fn linear_file() -> Vec<Stored> {
    let w = Tensor::randn(&[4, 64], 0.05, DType::F32, &mut Rng::new(3));
    let w = Nf4Weight::quantize(&w, 64, true).unwrap();
    linear_parts("m.weight", &w).into_iter().map(|p| (p.name, p.dtype, p.shape, p.data)).collect()
}

fn load_error(tensors: &[Stored]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let ck = checkpoint(dir.path(), tensors);
    let err = load_linear(&ck, "m", [4, 64]).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "names the file: {err}");
    err
}

fn replace(tensors: &[Stored], name: &str, f: impl Fn(&mut Stored)) -> Vec<Stored> {
    let mut out = tensors.to_vec();
    f(out.iter_mut().find(|t| t.0 == name).expect("tensor to damage"));
    out
}

#[test]
fn damaged_4bit_weights_are_refused_naming_the_tensor() {
    let good = linear_file();
    let state = "m.weight.quant_state.bitsandbytes__nf4";
    let json = |s: &str| {
        replace(&good, state, |t| {
            t.3 = s.as_bytes().to_vec();
            t.2 = vec![t.3.len()];
        })
    };
    let original = String::from_utf8(good.iter().find(|t| t.0 == state).unwrap().3.clone()).unwrap();
    let cases: Vec<(Vec<Stored>, &str)> = vec![
        (json(&original.replace("[4, 64]", "[64, 4]")), "tensor m.weight.quant_state.bitsandbytes__nf4: shape [64, 4]"),
        (json(&original[..20]), "quant state JSON is malformed"),
        (json(&original.replace("\"blocksize\": 64", "\"blocksize\": 65")), "blocksize 65"),
        (
            replace(&good, state, |t| t.0 = "m.weight.quant_state.bitsandbytes__fp4".into()),
            "tensor m.weight.quant_state.bitsandbytes__fp4: bitsandbytes fp4 weights are not supported",
        ),
        (replace(&good, "m.weight.absmax", |t| t.1 = Dtype::I8), "tensor m.weight.absmax: I8 [4], expected U8 [4]"),
        (
            replace(&good, "m.weight.absmax", |t| {
                t.1 = Dtype::F32;
                t.2 = vec![1];
            }),
            "tensor m.weight.absmax: F32 [1], expected U8 [4]",
        ),
        (
            replace(&good, "m.weight", |t| {
                t.1 = Dtype::BF16;
                t.2 = vec![64, 1];
            }),
            "tensor m.weight: packed 4-bit data stored as BF16",
        ),
        (replace(&good, "m.weight", |t| t.2 = vec![1, 128]), "tensor m.weight: U8 [1, 128], expected U8 [128, 1]"),
        (replace(&good, "m.weight.quant_map", |t| t.3[0] ^= 1), "tensor m.weight.quant_map: is not the NF4 code"),
        (
            good.iter().filter(|t| t.0 != "m.weight.nested_absmax").cloned().collect(),
            "tensor m.weight.nested_absmax: missing",
        ),
    ];
    for (tensors, expected) in cases {
        let err = load_error(&tensors);
        assert!(err.contains(expected), "expected {expected:?} in: {err}");
    }
    let int8 = vec![
        ("m.weight".into(), Dtype::I8, vec![4, 64], vec![0; 256]),
        ("m.SCB".into(), Dtype::F32, vec![4], vec![0; 16]),
    ];
    assert!(load_error(&int8).contains("tensor m.SCB: bitsandbytes 8-bit (LLM.int8) weights are not supported"));
}

#[test]
fn quantizing_refuses_an_already_quantized_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = linear_file();
    tensors.iter_mut().for_each(|t| t.0 = t.0.replace("m.weight", "model.layers.0.mlp.up_proj.weight"));
    let src = checkpoint(dir.path(), &tensors);
    let err = write_quantized(&src, OPTS, &mut Cursor::new(Vec::new()), Path::new("out")).unwrap_err().to_string();
    assert!(err.contains("tensor model.layers.0.mlp.up_proj.weight: U8 [128, 1]") && err.contains("already"), "{err}");
}

fn llama_config() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama/config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn config_gains_transformers_quantization_config() {
    let source = serde_json::to_string(&llama_config()).unwrap();
    let text = quantized_config_json(&source, Path::new("config.json"), OPTS).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let q = &v["quantization_config"];
    assert_eq!((q["quant_method"].as_str(), q["load_in_4bit"].as_bool()), (Some("bitsandbytes"), Some(true)));
    assert_eq!(q["bnb_4bit_use_double_quant"], Value::Bool(true));
    assert_eq!(v["rms_norm_eps"], llama_config()["rms_norm_eps"], "other fields unchanged");
    assert!(text.ends_with("}\n") && text.contains("\n  \"quantization_config\": {\n    \"_load_in_4bit\": true,"));
    let again = quantized_config_json(&text, Path::new("q/config.json"), OPTS).unwrap_err().to_string();
    assert!(again.contains("q/config.json: quantization_config: the model is already quantized"), "{again}");
}

/// The QLoRA paper's accounting on a model whose every linear has at least 256 NF4 blocks: 4 + 32/64 = 4.5 bits
/// per parameter without double quantization, 4 + 8/64 + 32/(64·256) ≈ 4.127 with it; and the loaded model
/// holds exactly the bytes the file stores.
#[test]
fn bits_per_param_on_a_quantized_model() {
    let mut config = llama_config();
    for (key, value) in [("hidden_size", 256), ("intermediate_size", 512), ("head_dim", 64), ("num_hidden_layers", 1)] {
        config[key] = value.into();
    }
    let (h, i, kv, v) = (256, 512, 128, 101);
    let mut rng = Rng::new(11);
    let mut t = |name: &str, shape: &[usize]| stored(name, &Tensor::randn(shape, 0.02, DType::F32, &mut rng));
    let p = "model.layers.0";
    let source = vec![
        t("model.embed_tokens.weight", &[v, h]),
        t("lm_head.weight", &[v, h]),
        t("model.norm.weight", &[h]),
        t(&format!("{p}.input_layernorm.weight"), &[h]),
        t(&format!("{p}.post_attention_layernorm.weight"), &[h]),
        t(&format!("{p}.self_attn.q_proj.weight"), &[h, h]),
        t(&format!("{p}.self_attn.k_proj.weight"), &[kv, h]),
        t(&format!("{p}.self_attn.v_proj.weight"), &[kv, h]),
        t(&format!("{p}.self_attn.o_proj.weight"), &[h, h]),
        t(&format!("{p}.mlp.gate_proj.weight"), &[i, h]),
        t(&format!("{p}.mlp.up_proj.weight"), &[i, h]),
        t(&format!("{p}.mlp.down_proj.weight"), &[h, i]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let src = checkpoint(dir.path(), &source);
    for (double_quant, bits) in [(true, 4.127), (false, 4.5)] {
        let out = tempfile::tempdir().unwrap();
        let mut file = std::fs::File::create(out.path().join("model.safetensors")).unwrap();
        let summary = write_quantized(&src, QuantizeOptions { double_quant, ..OPTS }, &mut file, out.path()).unwrap();
        drop(file);
        assert_eq!((summary.linears, summary.params), (7, 2 * h * h + 2 * kv * h + 3 * i * h));
        assert_eq!((summary.bits_per_param() * 1000.0).round() / 1000.0, bits, "{}", summary.bits_per_param());
        std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
        // The file's quantization wins over the format asked for: no requantization.
        let asked = BaseFormat::Nf4 { blocksize: 128, double_quant: !double_quant };
        let model = CausalLm::load(out.path(), asked).unwrap();
        let mut held = 0;
        for proj in model.projections() {
            let BaseWeight::Nf4(w) = &proj.base else { panic!("{} is not NF4", proj.name) };
            assert_eq!((w.blocksize, matches!(*w.absmax, Absmax::Nested { .. })), (64, double_quant));
            assert_eq!(w.bits_per_param(), nf4::nf4_bits_per_param(w.elem_count(), 64, double_quant));
            held += w.size_in_bytes();
        }
        assert_eq!(held, summary.quantized_bytes);
    }
}
