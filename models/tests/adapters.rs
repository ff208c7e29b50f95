//! Adapters at inference time on the tiny Llama fixture: a folded adapter (what `generate` runs) gives the logits
//! and greedy tokens of the same adapter applied unmerged over the NF4 base (what it was trained as), for LoRA
//! (the peft fixture adapter) and DoRA; `with_adapter` shares the base between adapters.

use qlora_autograd::{LoraAdapter, LoraConfig};
use qlora_models::adapters::ModelAdapter;
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::peft::read_adapter;
use qlora_models::generate::{generate, GenerateOptions, LogitsFor, Sampling};
use qlora_models::kv_cache::KvCache;
use qlora_models::transformer::{BaseFormat, CausalLm};
use qlora_runtime::nf4::DEFAULT_BLOCKSIZE;
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::testing::{assert_close, Tolerance};
use qlora_runtime::{DType, Rng, Tensor};
use std::ops::ControlFlow;
use std::path::PathBuf;

/// Folding computes x·(W + s·B·A) where unfolded computes x·W + s·(x·Aᵀ)·Bᵀ: the same f32 products summed in
/// another order, plus one rounding of W + s·B·A: f32 rounding only. On this model the logits agree within ~2e-8;
/// 1e-5 leaves room for other summation orders and is under a hundredth of what the adapters here move them by.
const FOLD: Tolerance = Tolerance { abs: 1e-5, rel: 1e-5 };

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama")
}

fn nf4_base() -> CausalLm {
    CausalLm::load(&fixture(), BaseFormat::Nf4 { blocksize: DEFAULT_BLOCKSIZE, double_quant: true }).unwrap()
}

fn ids() -> Vec<u32> {
    let reference = Checkpoint::from_files(&[fixture().join("reference.safetensors")]).unwrap();
    reference.load("input_ids").unwrap().to_vec::<i32>().into_iter().map(|i| i as u32).collect()
}

fn peft_adapter(model: &CausalLm) -> ModelAdapter {
    let shapes: Vec<(String, [usize; 2])> =
        model.projections().iter().map(|p| (p.name.clone(), p.base.shape())).collect();
    read_adapter(&fixture().join("adapter"), &shapes).unwrap()
}

/// The peft fixture adapter with its scaling ×32: the file's own moves the logits by only ~5e-3.
fn strong(mut adapter: ModelAdapter) -> ModelAdapter {
    adapter.values_mut().for_each(|a| a.config.alpha *= 32.0);
    adapter
}

/// A DoRA adapter on every projection, with B and m random so that it changes the model.
fn dora_adapter(model: &CausalLm) -> ModelAdapter {
    let mut rng = Rng::new(17);
    let config = LoraConfig { r: 4, alpha: 32.0, use_dora: true, ..LoraConfig::default() };
    model
        .projections()
        .iter()
        .map(|p| {
            let ad = LoraAdapter::new(&p.name, &p.base, &config, &mut rng).unwrap();
            ad.lora_b.set_value(Tensor::randn(ad.lora_b.value().shape(), 1.0, DType::F32, &mut rng));
            // m starts at the row norms, which leaves their lengths alone: rescale the rows too.
            let m = ad.magnitude.as_ref().expect("a DoRA adapter has m");
            let rows: Vec<f32> =
                m.value().to_vec::<f32>().iter().map(|x| x * (0.5 + 1.5 * rng.uniform() as f32)).collect();
            m.set_value(Tensor::from_vec(rows, &[p.base.shape()[0]]).unwrap());
            (p.name.clone(), ad)
        })
        .collect()
}

fn all_logits(model: &CausalLm, ids: &[u32]) -> Vec<f64> {
    let mut cache = KvCache::new(&model.config, 1);
    model.forward_cached(&mut cache, &[ids], LogitsFor::All).unwrap().to_vec::<f64>()
}

fn greedy(model: &CausalLm, prompt: &[u32]) -> Vec<u32> {
    let options = GenerateOptions { max_new_tokens: 24, sampling: Sampling::Greedy, stop_tokens: vec![] };
    generate(model, prompt, &options, |_| ControlFlow::Continue(())).unwrap().tokens
}

#[test]
fn folded_adapters_generate_what_unfolded_ones_do() {
    let base = nf4_base();
    let ids = ids();
    let plain = all_logits(&base, &ids);
    for (kind, adapter) in [("lora", strong(peft_adapter(&base))), ("dora", dora_adapter(&base))] {
        let unfolded = base.with_adapter(Some(&adapter)).unwrap();
        let folded = unfolded.fold_adapters().unwrap();
        assert!(folded.projections().iter().all(|p| p.adapter.is_none() && matches!(p.base, BaseWeight::Dense(_))));
        let (want, got) = (all_logits(&unfolded, &ids), all_logits(&folded, &ids));
        assert_close(&format!("{kind} folded logits"), &got, &want, FOLD);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        eprintln!("{kind}: folded logits within {worst:.1e} of unfolded");
        let moved = want.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        // A hundred times the tolerance: a fold that lost the adapter could not pass.
        assert!(moved > 1e-3, "{kind}: the adapter must change the logits for the check to mean anything ({moved})");
        assert_eq!(greedy(&folded, &ids[..4]), greedy(&unfolded, &ids[..4]), "{kind}: greedy tokens");
    }
}

#[test]
fn a_folded_projection_is_the_merged_weight() {
    let base = nf4_base();
    let adapter = peft_adapter(&base);
    let folded = base.with_adapter(Some(&adapter)).unwrap().fold_adapters().unwrap();
    for (p, f) in base.projections().iter().zip(folded.projections()) {
        let BaseWeight::Dense(got) = &f.base else { panic!("{} is not dense", f.name) };
        let want = match adapter.get(&p.name) {
            Some(ad) => qlora_autograd::merged_weight(&p.base, ad, DType::F32).unwrap(),
            None => p.base.materialize(DType::F32).unwrap(),
        };
        assert_eq!(got.to_vec::<f32>(), want.to_vec::<f32>(), "{}", p.name);
    }
}

#[test]
fn adapters_share_one_base() {
    let dense = CausalLm::load(&fixture(), BaseFormat::Dense(DType::F32)).unwrap();
    let adapter = peft_adapter(&dense);
    let with = dense.with_adapter(Some(&adapter)).unwrap();
    let without = with.with_adapter(None).unwrap();
    let folded_plain = without.fold_adapters().unwrap();
    for (((d, w), o), f) in
        dense.projections().iter().zip(with.projections()).zip(without.projections()).zip(folded_plain.projections())
    {
        let (BaseWeight::Dense(a), BaseWeight::Dense(b), BaseWeight::Dense(c)) = (&d.base, &w.base, &f.base) else {
            panic!("dense bases")
        };
        assert!(a.shares_storage(b) && a.shares_storage(c), "{}: the base is shared, not copied", d.name);
        assert_eq!(w.adapter.is_some(), adapter.contains_key(&w.name));
        assert!(o.adapter.is_none());
    }
    assert_eq!(all_logits(&without, &ids()), all_logits(&dense, &ids()));
    // Eval mode: dropout is off whatever the adapter file says.
    let mut dropping = adapter.clone();
    dropping.values_mut().for_each(|a| a.config.dropout = 0.3);
    let attached = dense.with_adapter(Some(&dropping)).unwrap();
    assert!(attached.projections().iter().filter_map(|p| p.adapter.as_ref()).all(|a| a.config.dropout == 0.0));

    let mut stray = adapter;
    let some = stray.values().next().unwrap().clone();
    stray.insert("model.layers.9.mlp.up_proj".into(), some);
    let e = dense.with_adapter(Some(&stray)).err().unwrap().to_string();
    assert!(e.contains("model.layers.9.mlp.up_proj"), "{e}");
}

/// A model whose adapters carry training dropout (one being fine-tuned, not one loaded for inference) decodes in
/// peft's eval mode all the same: cached logits equal those of the same adapters without dropout, bit for bit, while
/// a training forward with them does drop (so the dropout is real and the comparison can fail).
#[test]
fn cached_decoding_never_drops() {
    use qlora_autograd::Tape;
    use qlora_models::transformer::Batch;
    let mut training = CausalLm::load(&fixture(), BaseFormat::Dense(DType::F32)).unwrap();
    let adapter = strong(peft_adapter(&training));
    for p in training.projections_mut().unwrap() {
        p.adapter = adapter.get(&p.name).map(|a| {
            let mut a = a.clone();
            a.config.dropout = 0.5;
            a
        });
    }
    let eval = training.with_adapter(Some(&adapter)).unwrap();
    assert_eq!(all_logits(&training, &ids()), all_logits(&eval, &ids()));
    let tokens: Vec<i32> = ids().iter().map(|&i| i as i32).collect();
    let batch = Batch::pack(&[(tokens.clone(), tokens)]).unwrap();
    let tape = Tape::new();
    let dropped = training.logits(&tape, &batch, 7).unwrap().value().to_vec::<f64>();
    assert_ne!(dropped, all_logits(&eval, &ids()), "adapter dropout applies in training");
}
