//! Every ggml type qlora-rt dequantizes, against llama.cpp's own numpy dequantizers (`gguf.quants.dequantize`),
//! on the fixtures of `scripts/reference/gguf_fixtures.py`: one 4 × 256 tensor per type in quants.gguf and its
//! reference values in quants_ref.safetensors. The Rust side repeats gguf-py's f32 arithmetic operation for
//! operation, so the values must agree bit for bit.

use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::gguf::{dequant::DEQUANTIZABLE, dequantize, GgufFile};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf")
}

#[test]
fn every_type_matches_gguf_py_bit_for_bit() {
    let file = GgufFile::open(&fixtures().join("quants.gguf")).unwrap();
    let reference = Checkpoint::from_files(&[fixtures().join("quants_ref.safetensors")]).unwrap();
    for ty in DEQUANTIZABLE {
        let name = format!("q.{}", ty.name());
        let t = file.tensor(&name).unwrap_or_else(|| panic!("{name} missing from quants.gguf"));
        assert_eq!((t.ty, t.shape()), (ty, vec![4, 256]), "{name}");
        let mut got = vec![0.0f32; t.n_elements];
        dequantize(t.ty, file.tensor_bytes(t), &mut got).unwrap();
        let want = reference.load_shaped(&name, &[4, 256]).unwrap().to_vec::<f32>();
        let diffs: Vec<usize> = (0..got.len()).filter(|&i| got[i].to_bits() != want[i].to_bits()).collect();
        assert!(
            diffs.is_empty(),
            "{name}: {} of {} values differ, first at {}: {} vs gguf-py {}",
            diffs.len(),
            got.len(),
            diffs[0],
            got[diffs[0]],
            want[diffs[0]]
        );
        assert!(got.iter().any(|&v| v != 0.0), "{name}: the fixture is not all zeros");
    }
}
