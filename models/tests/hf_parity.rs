//! Llama, Gemma, Gemma 2 and Gemma 3 against transformers: tiny random checkpoints and the logits, loss and
//! NF4 logits transformers (+ bitsandbytes) computed for them, made by scripts/reference/tiny_models.py.

use qlora_autograd::Tape;
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_runtime::testing::{assert_close, Tolerance};
use qlora_runtime::DType;
use std::path::PathBuf;

fn fixture(family: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(family);
    assert!(
        dir.join("reference.safetensors").exists(),
        "missing fixture {}: run `python3 scripts/reference/tiny_models.py --out tests/fixtures/models`",
        dir.display()
    );
    dir
}

struct Reference {
    ck: Checkpoint,
}

impl Reference {
    fn open(dir: &std::path::Path) -> Self {
        Reference { ck: Checkpoint::from_files(&[dir.join("reference.safetensors")]).unwrap() }
    }
    fn f64s(&self, name: &str) -> Vec<f64> {
        self.ck.load(name).unwrap().to_vec::<f64>()
    }
    fn batch(&self) -> Batch {
        let ids = self.ck.load("input_ids").unwrap().to_vec::<i32>();
        Batch::pack(&[(ids.clone(), ids)]).unwrap()
    }
}

/// f32 forward of the same f32 weights: summation order differs, values agree to ~1e-6 relative.
const LOGITS: Tolerance = Tolerance { abs: 1e-5, rel: 1e-4 };

fn check_dense(family: &str) {
    let dir = fixture(family);
    let r = Reference::open(&dir);
    let model = CausalLm::load(&dir, BaseFormat::Dense(DType::F32)).unwrap();
    let batch = r.batch();
    let tape = Tape::new();
    let logits = tape.no_grad(|| model.logits(&tape, &batch, 0)).unwrap();
    assert_close(&format!("{family} logits"), &logits.value().to_vec::<f64>(), &r.f64s("logits"), LOGITS);
    let n = batch.trained_tokens() as f64;
    let loss = tape.no_grad(|| model.loss(&tape, &batch, n, 0)).unwrap().value().to_scalar::<f64>().unwrap();
    assert_close(&format!("{family} loss"), &[loss], &r.f64s("loss"), Tolerance { abs: 1e-5, rel: 1e-5 });
}

/// Our NF4 quantization is bnb's bit for bit (the nested offset up to an ulp), so the dequantized weights agree
/// and only f32 summation order separates the logits.
fn check_nf4(family: &str) {
    let dir = fixture(family);
    let r = Reference::open(&dir);
    if !r.ck.contains("nf4_logits") {
        panic!("{family}: the fixture lacks nf4_logits (regenerate it on a machine with CUDA and bitsandbytes)");
    }
    let model = CausalLm::load(&dir, BaseFormat::Nf4 { blocksize: 64, double_quant: true }).unwrap();
    let tape = Tape::new();
    let logits = tape.no_grad(|| model.logits(&tape, &r.batch(), 0)).unwrap();
    assert_close(&format!("{family} NF4 logits"), &logits.value().to_vec::<f64>(), &r.f64s("nf4_logits"), LOGITS);
}

#[test]
fn llama_matches_transformers() {
    check_dense("llama");
    check_nf4("llama");
}

#[test]
fn gemma_matches_transformers() {
    check_dense("gemma");
    check_nf4("gemma");
}

#[test]
fn gemma2_matches_transformers() {
    check_dense("gemma2");
    check_nf4("gemma2");
}

#[test]
fn gemma3_matches_transformers() {
    check_dense("gemma3");
    check_nf4("gemma3");
}

/// With peft's adapter (all linear layers, non-zero B) attached: loss and every adapter gradient against peft's,
/// and the same gradients, bit for bit, without gradient checkpointing.
fn check_lora(family: &str) {
    let dir = fixture(family);
    let r = Reference::open(&dir);
    let mut model = CausalLm::load(&dir, BaseFormat::Dense(DType::F32)).unwrap();
    let adapted = qlora_models::formats::peft::load_adapter(&mut model, &dir.join("adapter")).unwrap();
    assert_eq!(adapted, 7 * model.config.num_hidden_layers);
    let batch = r.batch();
    let n = batch.trained_tokens() as f64;
    let mut grads_by_mode = Vec::new();
    for checkpointing in [true, false] {
        model.gradient_checkpointing = checkpointing;
        let params = model.trainable_params();
        params.iter().for_each(|p| p.zero_grad());
        let tape = Tape::new();
        let loss = model.loss(&tape, &batch, n, 0).unwrap();
        tape.backward(&loss).unwrap();
        let value = loss.value().to_scalar::<f64>().unwrap();
        assert_close(
            &format!("{family} LoRA loss"),
            &[value],
            &r.f64s("lora_loss"),
            Tolerance { abs: 1e-5, rel: 1e-5 },
        );
        let mut grads = Vec::new();
        for p in &params {
            let got = p.grad().unwrap_or_else(|| panic!("{}: no gradient", p.name())).to_vec::<f64>();
            let want = r.f64s(&format!("grad.{}{}", qlora_models::formats::peft::KEY_PREFIX, p.name()));
            // Gradients are differences of nearly equal f32 sums: 1e-3 relative, with an absolute floor.
            assert_close(&format!("{family} {}", p.name()), &got, &want, Tolerance { abs: 1e-6, rel: 1e-3 });
            grads.push(got);
        }
        grads_by_mode.push(grads);
    }
    assert_eq!(grads_by_mode[0], grads_by_mode[1], "{family}: checkpointing changed the gradients");
}

#[test]
fn lora_gradients_match_peft() {
    for family in ["llama", "gemma", "gemma2", "gemma3"] {
        check_lora(family);
    }
}

#[test]
fn saved_adapters_reload_bit_for_bit() {
    let dir = fixture("llama");
    let mut model = CausalLm::load(&dir, BaseFormat::Dense(DType::F32)).unwrap();
    qlora_models::formats::peft::load_adapter(&mut model, &dir.join("adapter")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let n = qlora_models::formats::peft::save_adapter(&model, out.path(), Some("tiny-llama")).unwrap();
    assert_eq!(n, 14);
    let original = Checkpoint::from_files(&[dir.join("adapter/adapter_model.safetensors")]).unwrap();
    let saved = Checkpoint::from_files(&[out.path().join("adapter_model.safetensors")]).unwrap();
    assert_eq!(original.names(), saved.names());
    for name in original.names() {
        assert_eq!(original.bytes(name).unwrap(), saved.bytes(name).unwrap(), "{name}");
    }
    let mut again = CausalLm::load(&dir, BaseFormat::Dense(DType::F32)).unwrap();
    assert_eq!(qlora_models::formats::peft::load_adapter(&mut again, out.path()).unwrap(), 14);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["target_modules"],
        serde_json::json!(["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])
    );
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
}
