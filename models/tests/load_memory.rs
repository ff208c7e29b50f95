//! Loading streams tensor by tensor: on a synthetic sharded bf16 checkpoint, quantizing to NF4 on load, the host
//! memory in use beyond what the loaded model keeps never exceeds twice the largest tensor.
//! (This file's global allocator counts every allocation of the test binary, so it holds this one test alone.)

use qlora_models::transformer::{BaseFormat, CausalLm};
use safetensors::tensor::{Dtype, TensorView};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
        System.dealloc(p, l)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const H: usize = 256;
const I: usize = 1024;
const V: usize = 1000;
const LAYERS: usize = 4;

fn tensors_of_layer(i: usize) -> Vec<(String, Vec<usize>)> {
    let p = format!("model.layers.{i}");
    vec![
        (format!("{p}.input_layernorm.weight"), vec![H]),
        (format!("{p}.post_attention_layernorm.weight"), vec![H]),
        (format!("{p}.self_attn.q_proj.weight"), vec![H, H]),
        (format!("{p}.self_attn.k_proj.weight"), vec![H / 2, H]),
        (format!("{p}.self_attn.v_proj.weight"), vec![H / 2, H]),
        (format!("{p}.self_attn.o_proj.weight"), vec![H, H]),
        (format!("{p}.mlp.gate_proj.weight"), vec![I, H]),
        (format!("{p}.mlp.up_proj.weight"), vec![I, H]),
        (format!("{p}.mlp.down_proj.weight"), vec![H, I]),
    ]
}

/// Two bf16 shards and their index; returns the largest tensor's size in bytes.
fn write_checkpoint(dir: &Path) -> usize {
    std::fs::write(
        dir.join("config.json"),
        format!(
            r#"{{"model_type":"llama","vocab_size":{V},"hidden_size":{H},"intermediate_size":{I},"num_hidden_layers":{LAYERS},
               "num_attention_heads":8,"num_key_value_heads":4,"tie_word_embeddings":false}}"#
        ),
    )
    .unwrap();
    let mut shards: Vec<Vec<(String, Vec<usize>)>> = vec![vec![], vec![]];
    shards[0].push(("model.embed_tokens.weight".into(), vec![V, H]));
    for i in 0..LAYERS {
        shards[i * 2 / LAYERS].extend(tensors_of_layer(i));
    }
    shards[1].push(("model.norm.weight".into(), vec![H]));
    shards[1].push(("lm_head.weight".into(), vec![V, H]));
    let mut weight_map = serde_json::Map::new();
    let mut largest = 0;
    for (s, tensors) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", s + 1);
        // Small deterministic values as bf16 bits (0x3c00 ≈ 0.0078 plus a ramp).
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, shape)| {
                let count: usize = shape.iter().product();
                let bytes = (0..count).flat_map(|k| (0x3c00u16 + (k % 97) as u16).to_le_bytes()).collect();
                (n.clone(), bytes, shape.clone())
            })
            .collect();
        for (n, b, _) in &data {
            largest = largest.max(b.len());
            weight_map.insert(n.clone(), file.clone().into());
        }
        let views: Vec<(String, TensorView)> =
            data.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::BF16, s.clone(), b).unwrap())).collect();
        safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &dir.join(&file)).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    largest
}

#[test]
fn loading_holds_at_most_two_largest_tensors_beyond_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let largest = write_checkpoint(dir.path());
    for format in [BaseFormat::Nf4 { blocksize: 64, double_quant: true }, BaseFormat::Dense(qlora_runtime::DType::BF16)]
    {
        let before = CURRENT.load(Ordering::Relaxed);
        PEAK.store(before, Ordering::Relaxed);
        let model = CausalLm::load(dir.path(), format).unwrap();
        let kept = CURRENT.load(Ordering::Relaxed) - before;
        let transient = PEAK.load(Ordering::Relaxed) - before - kept;
        assert!(
            transient <= 2 * largest,
            "{format:?}: loading used {transient} bytes beyond the {kept} the model keeps; largest tensor {largest}"
        );
        assert_eq!(model.config.num_hidden_layers, LAYERS);
        drop(model);
    }
}
