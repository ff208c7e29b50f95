//! A model whose decoder NF4 weights are sharded across the ranks of an in-process group (`CausalLm::load_sharded`)
//! computes what the whole model computes, bit for bit: the loss and every adapter gradient, with and without
//! checkpointing (the layer gathered in forward and again in the recompute), with kept layers (the gathered weights
//! held until backward), with the MLP in checkpointed blocks, for single and double quantization and groups of 1 to
//! 3 ranks, each gather prefetching the layer expected next; and each rank holds only its share of the bytes.

use qlora_autograd::{LoraAdapter, LoraConfig, Tape};
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_runtime::dist::{local_group, Communicator};
use qlora_runtime::quant::BaseWeight;
use qlora_runtime::{DType, Device, Rng, Tensor};
use std::path::PathBuf;
use std::sync::Arc;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama")
}

/// Runs `f` on every rank of an in-process group of `n`, one thread each; the results by rank.
fn on_ranks<T: Send>(n: usize, f: impl Fn(Arc<dyn Communicator>) -> T + Sync) -> Vec<T> {
    let ranks = local_group(n).unwrap();
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = ranks.into_iter().map(|r| s.spawn(move || f(Arc::new(r)))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// An adapter on every projection with B random, so that every gradient is non-zero.
fn adapt(model: &mut CausalLm) {
    let mut rng = Rng::new(5);
    let config = LoraConfig { r: 4, alpha: 16.0, dropout: 0.1, ..LoraConfig::default() };
    for p in model.projections_mut().unwrap() {
        let ad = LoraAdapter::new(&p.name, &p.base, &config, &mut rng).unwrap();
        ad.lora_b.set_value(Tensor::randn(ad.lora_b.value().shape(), 0.1, DType::F32, &mut rng));
        p.adapter = Some(ad);
    }
}

/// How the step runs: checkpointing, layers kept under it, MLP block tokens.
type Plan = (bool, usize, Option<usize>);

/// The loss and every adapter gradient of one step, as bits.
fn step(model: &mut CausalLm, (checkpointing, keep, chunk): Plan) -> Vec<u32> {
    model.gradient_checkpointing = checkpointing;
    model.keep_layers = keep;
    model.mlp_chunk_tokens = chunk;
    let batch =
        Batch::pack(&[((1..12).collect(), (2..13).collect()), (vec![7, 3, 9, 4, 1], vec![3, 9, 4, 1, 2])]).unwrap();
    let tape = Tape::new();
    let loss = model.loss(&tape, &batch, 16.0, 3).unwrap();
    tape.backward(&loss).unwrap();
    let mut bits: Vec<u32> = loss.value().to_vec::<f32>().iter().map(|x| x.to_bits()).collect();
    for p in model.trainable_params() {
        let g = p.take_grad().unwrap_or_else(|| panic!("{} has no gradient", p.name()));
        bits.extend(g.to_vec::<f32>().iter().map(|x| x.to_bits()));
    }
    bits
}

#[test]
fn a_sharded_model_trains_as_the_whole_model_does() {
    let plans: [Plan; 3] = [(false, 0, None), (true, 0, None), (true, 1, Some(4))];
    // (prefetched, on demand) per step of the two-layer model: forward gathers layer 0 and finds layer 1 on its way;
    // backward's recomputes gather layer 1 and find layer 0 on its way; a kept layer 1 is not recomputed.
    let gathers = [(1, 1), (2, 2), (1, 2)];
    for double_quant in [false, true] {
        let format = BaseFormat::Nf4 { blocksize: 64, double_quant };
        let mut whole = CausalLm::load(&fixture(), format).unwrap();
        adapt(&mut whole);
        let nf4_bytes: usize = whole.projections().iter().map(|p| p.base.size_in_bytes()).sum();
        let expected: Vec<Vec<u32>> = plans.iter().map(|&plan| step(&mut whole, plan)).collect();
        for n in [1, 2, 3] {
            let held = on_ranks(n, |group| {
                let mut model = CausalLm::load_sharded(&fixture(), format, group, Device::Cpu).unwrap();
                assert!(model.projections().iter().all(|p| matches!(p.base, BaseWeight::Sharded { .. })));
                adapt(&mut model);
                for ((plan, want), (prefetched, on_demand)) in plans.iter().zip(&expected).zip(gathers) {
                    let before = model.sharded.as_ref().unwrap().counts();
                    assert!(step(&mut model, *plan) == *want, "{n} ranks, {plan:?}, double quant {double_quant}");
                    let after = model.sharded.as_ref().unwrap().counts();
                    let delta = (after.prefetched - before.prefetched, after.on_demand - before.on_demand);
                    assert_eq!(delta, (prefetched, on_demand), "{plan:?}");
                }
                model.sharded.as_ref().unwrap().size_in_bytes()
            });
            // Each rank holds a piece of each layer's two streams (padded to a multiple of n: at most 8 bytes more
            // per layer and rank).
            let layers = whole.layers.len();
            for (rank, bytes) in held.iter().enumerate() {
                assert!(bytes * n >= nf4_bytes - 4 * layers * 7, "rank {rank} of {n}: {bytes} of {nf4_bytes} bytes");
                assert!(*bytes <= nf4_bytes / n + 8 * layers, "rank {rank} of {n}: {bytes} of {nf4_bytes} bytes");
            }
        }
    }
}

/// Inference runs through the gathered layers too: logits under `no_grad` are the whole model's.
#[test]
fn a_sharded_model_gives_the_whole_models_logits() {
    let format = BaseFormat::Nf4 { blocksize: 64, double_quant: true };
    let whole = CausalLm::load(&fixture(), format).unwrap();
    let batch = Batch::pack(&[((1..9).collect(), (2..10).collect())]).unwrap();
    let logits = |m: &CausalLm| {
        let tape = Tape::new();
        tape.no_grad(|| m.logits(&tape, &batch, 0)).unwrap().value().to_vec::<f32>()
    };
    let want = logits(&whole);
    let BaseWeight::Nf4(orig) = whole.layers[0].self_attn.q_proj.base.clone() else { panic!("NF4") };
    on_ranks(2, |group| {
        let model = CausalLm::load_sharded(&fixture(), format, group, Device::Cpu).unwrap();
        assert!(logits(&model) == want);
        let l0 = model.gathered_layer(0).unwrap();
        let BaseWeight::Nf4(w) = &l0.self_attn.q_proj.base else { panic!("a gathered layer's weights are NF4") };
        assert_eq!(*w, orig, "a gathered weight is the loaded one");
    });
}
