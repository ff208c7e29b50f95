//! The examples a researcher starts from, run for real on the tiny Llama fixture: their bodies are compiled into
//! this test (cheaper than `cargo run --example`, which would build and start each one again).

#[allow(dead_code)] // its main, which only parses arguments
#[path = "../examples/custom_training.rs"]
mod custom_training;

#[allow(dead_code)]
#[path = "../examples/custom_op.rs"]
mod custom_op;

use qlora_rt::models::formats::peft::load_adapter;
use qlora_rt::models::transformer::{BaseFormat, CausalLm};
use qlora_rt::DType;
use std::path::Path;

#[test]
fn custom_training_lowers_the_loss_and_saves_a_loadable_adapter() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama");
    let out = tempfile::tempdir().unwrap();
    let (first, last) = custom_training::train(&fixture, out.path(), 12, 5e-2).unwrap();
    // The fixture's head is tiny (logits of std ~0.1, loss ≈ ln 101), so adapters move the loss little, but surely.
    assert!(last < first - 2e-3, "loss {first} → {last}");
    let mut model = CausalLm::load(&fixture, BaseFormat::Dense(DType::F32)).unwrap();
    // q_proj, v_proj and down_proj of each of the 2 layers.
    assert_eq!(load_adapter(&mut model, out.path()).unwrap(), 6);
}

#[test]
fn custom_op_backward_matches_finite_differences() {
    let worst = custom_op::check().unwrap();
    assert!(worst < 1e-2, "relative difference {worst}");
}
