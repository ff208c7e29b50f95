//! Decoding with a KV cache on the tiny fixture models (scripts/reference/tiny_models.py): incremental logits
//! equal one full-sequence forward, and generation is deterministic (greedy) or reproducible (seeded sampling).

use qlora_autograd::Tape;
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::generate::{generate, GenerateOptions, LogitsFor, Sampling, StopReason};
use qlora_models::kv_cache::KvCache;
use qlora_models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_runtime::testing::{assert_close, Tolerance};
use qlora_runtime::DType;
use std::ops::ControlFlow;
use std::path::PathBuf;

const FAMILIES: [&str; 4] = ["llama", "gemma", "gemma2", "gemma3"];

/// The same f32 arithmetic in a different summation order (attention over fewer rows at a time).
const TOL: Tolerance = Tolerance { abs: 1e-5, rel: 1e-4 };

fn load(family: &str) -> (CausalLm, Vec<u32>) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(family);
    let model = CausalLm::load(&dir, BaseFormat::Dense(DType::F32)).unwrap();
    let reference = Checkpoint::from_files(&[dir.join("reference.safetensors")]).unwrap();
    let ids = reference.load("input_ids").unwrap().to_vec::<i32>().into_iter().map(|i| i as u32).collect();
    (model, ids)
}

fn full_logits(model: &CausalLm, ids: &[u32]) -> Vec<f64> {
    let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let tape = Tape::new();
    let batch = Batch::pack(&[(ids.clone(), ids)]).unwrap();
    tape.no_grad(|| model.logits(&tape, &batch, 0)).unwrap().value().to_vec::<f64>()
}

/// 12 tokens, longer than the Gemma 2/3 sliding window (4), fed as a 5-token prompt, then 1, 2, 1, 3 tokens.
#[test]
fn cached_logits_equal_full_sequence_logits() {
    for family in FAMILIES {
        let (model, ids) = load(family);
        let want = full_logits(&model, &ids);
        let mut cache = KvCache::new(&model.config, 1);
        let mut got = Vec::new();
        let mut at = 0;
        for n in [5, 1, 2, 1, 3] {
            let chunk = &ids[at..at + n];
            got.extend(model.forward_cached(&mut cache, &[chunk], LogitsFor::All).unwrap().to_vec::<f64>());
            at += n;
            assert_eq!(cache.seq_len(0), at);
        }
        assert_eq!(at, ids.len());
        assert_close(&format!("{family} cached logits"), &got, &want, TOL);
    }
}

/// Two sequences of different lengths share one cache; each step's last-token logits match each sequence alone.
#[test]
fn one_cache_holds_several_sequences() {
    let (model, ids) = load("gemma2");
    let (a, b) = (&ids[..9], &ids[3..]);
    let (want_a, want_b) = (full_logits(&model, a), full_logits(&model, b));
    let vocab = model.config.vocab_size;
    let row = |v: &[f64], i: usize| v[i * vocab..(i + 1) * vocab].to_vec();
    let mut cache = KvCache::new(&model.config, 2);
    let first = model.forward_cached(&mut cache, &[&a[..4], &b[..6]], LogitsFor::Last).unwrap();
    assert_eq!(first.shape(), &[2, vocab]);
    let first = first.to_vec::<f64>();
    assert_close("a[3]", &first[..vocab], &row(&want_a, 3), TOL);
    assert_close("b[5]", &first[vocab..], &row(&want_b, 5), TOL);
    // b idles while a advances by one token.
    let step = model.forward_cached(&mut cache, &[&a[4..5], &[]], LogitsFor::Last).unwrap();
    assert_eq!(step.shape(), &[1, vocab]);
    assert_close("a[4]", &step.to_vec::<f64>(), &row(&want_a, 4), TOL);
    assert_eq!((cache.seq_len(0), cache.seq_len(1)), (5, 6));
    let step = model.forward_cached(&mut cache, &[&a[5..], &b[6..]], LogitsFor::Last).unwrap().to_vec::<f64>();
    assert_close("a[8]", &step[..vocab], &row(&want_a, 8), TOL);
    assert_close("b[8]", &step[vocab..], &row(&want_b, 8), TOL);
}

#[test]
fn a_failed_step_leaves_the_cache_unchanged() {
    let (model, ids) = load("llama");
    let mut cache = KvCache::new(&model.config, 1);
    model.forward_cached(&mut cache, &[&ids[..3]], LogitsFor::Last).unwrap();
    let e = model.forward_cached(&mut cache, &[&[5, 101]], LogitsFor::Last).unwrap_err().to_string();
    assert!(e.contains("101"), "{e}");
    assert_eq!(cache.seq_len(0), 3);
    assert!(model.forward_cached(&mut cache, &[&ids[..1], &ids[..1]], LogitsFor::Last).is_err());
}

fn run(model: &CausalLm, prompt: &[u32], sampling: Sampling, stop: &[u32], max: usize) -> (Vec<u32>, StopReason) {
    let options = GenerateOptions { max_new_tokens: max, sampling, stop_tokens: stop.to_vec() };
    let mut streamed = Vec::new();
    let g = generate(model, prompt, &options, |t| {
        streamed.push(t);
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(streamed, g.tokens, "the callback sees every returned token, in order");
    (g.tokens, g.stop)
}

#[test]
fn greedy_is_deterministic_and_matches_full_forward() {
    for family in FAMILIES {
        let (model, ids) = load(family);
        let prompt = &ids[..4];
        let (tokens, stop) = run(&model, prompt, Sampling::Greedy, &[], 8);
        assert_eq!(stop, StopReason::MaxNewTokens);
        assert_eq!(tokens.len(), 8);
        assert_eq!(run(&model, prompt, Sampling::Greedy, &[], 8).0, tokens, "{family}");
        // Without a cache: the argmax of the last row of a full forward over prompt + what came before.
        let mut seq = prompt.to_vec();
        for &t in &tokens {
            let logits = full_logits(&model, &seq);
            let last = &logits[logits.len() - model.config.vocab_size..];
            let argmax = (0..last.len()).fold(0, |b, i| if last[i] > last[b] { i } else { b });
            assert_eq!(argmax as u32, t, "{family}");
            seq.push(t);
        }
    }
}

#[test]
fn sampling_is_reproducible_by_seed_and_top_k_1_is_greedy() {
    let (model, ids) = load("gemma3");
    let prompt = &ids[..3];
    let random = |seed, top_k, top_p| Sampling::Random { temperature: 1.5, top_k, top_p, seed };
    let a = run(&model, prompt, random(7, None, None), &[], 12).0;
    assert_eq!(a, run(&model, prompt, random(7, None, None), &[], 12).0);
    let others: Vec<Vec<u32>> = (8..12).map(|s| run(&model, prompt, random(s, None, None), &[], 12).0).collect();
    assert!(others.iter().any(|o| *o != a), "different seeds should not all agree on 12 tokens at temperature 1.5");
    let greedy = run(&model, prompt, Sampling::Greedy, &[], 12).0;
    for seed in 0..3 {
        assert_eq!(run(&model, prompt, random(seed, Some(1), None), &[], 12).0, greedy);
        assert_eq!(run(&model, prompt, random(seed, None, Some(1e-6)), &[], 12).0, greedy);
    }
}

#[test]
fn stop_tokens_context_and_cancellation_end_generation() {
    let (model, ids) = load("llama");
    let prompt = &ids[..4];
    let greedy = run(&model, prompt, Sampling::Greedy, &[], 6).0;
    let (tokens, stop) = run(&model, prompt, Sampling::Greedy, &[greedy[2]], 6);
    let first = greedy.iter().position(|&t| t == greedy[2]).unwrap();
    assert_eq!((tokens, stop), (greedy[..first].to_vec(), StopReason::StopToken(greedy[2])));

    let context = model.config.max_position_embeddings;
    let (tokens, stop) = run(&model, prompt, Sampling::Greedy, &[], 1000);
    assert_eq!(stop, StopReason::ContextFull);
    assert_eq!(prompt.len() + tokens.len(), context + 1, "the last token is predicted at the last position");

    let options = GenerateOptions { max_new_tokens: 10, sampling: Sampling::Greedy, stop_tokens: vec![] };
    let g = generate(&model, prompt, &options, |_| ControlFlow::Break(())).unwrap();
    assert_eq!((g.tokens.len(), g.stop), (1, StopReason::Cancelled));
    assert!(generate(&model, &[], &options, |_| ControlFlow::Continue(())).is_err());
}
