//! Generation with a KV cache ([`KvCache`]): a cached forward that runs only new tokens, and a decoding loop with
//! greedy, temperature, top-k and top-p sampling, stop tokens and a per-token callback for streaming.
//! Must not own model structure (`transformer`), the cache (`kv_cache`) or text (`tokenizer`).

use crate::error::{Error, Result};
use crate::formats::tokenizer::GenerationConfig;
use crate::kv_cache::KvCache;
use crate::transformer::CausalLm;
use qlora_autograd::{Tape, Var};
use qlora_runtime::ops::attention::SeqLens;
use qlora_runtime::ops::embedding::embedding;
use qlora_runtime::Rng;
use qlora_runtime::{Device, Tensor};
use std::ops::ControlFlow;

fn invalid(msg: impl Into<String>) -> Error {
    Error::Runtime(qlora_runtime::Error::invalid("generate", msg.into()))
}

/// Which logits [`CausalLm::forward_cached`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every new token: [Σ new, vocab].
    All,
    /// The last new token of each sequence that got any: [such sequences, vocab]. What decoding needs, without
    /// a [prompt, vocab] matrix.
    Last,
}

impl CausalLm {
    /// Runs `new[s]` tokens after what `cache` holds for sequence s (an empty slice leaves it idle) and appends
    /// them to the cache, on the model's device (the logits stay there). On error the cache is left as it was.
    pub fn forward_cached(&self, cache: &mut KvCache, new: &[&[u32]], which: LogitsFor) -> Result<Tensor> {
        if new.len() != cache.sequences() {
            return Err(invalid(format!("{} sequences given to a cache of {}", new.len(), cache.sequences())));
        }
        let before: Vec<usize> = (0..new.len()).map(|s| cache.seq_len(s)).collect();
        let (mut ids, mut positions, mut cu) = (Vec::new(), Vec::new(), vec![0i32]);
        // Checked here, before anything runs: a GPU's embedding kernel would only mark the row with NaN.
        let vocab = self.embed_tokens.value().shape()[0];
        for (s, tokens) in new.iter().enumerate() {
            for (i, &id) in tokens.iter().enumerate() {
                if id as usize >= vocab {
                    return Err(invalid(format!("token id {id} is out of range for a vocabulary of {vocab}")));
                }
                ids.push(id as i32);
                positions.push((before[s] + i) as i32);
            }
            cu.push(ids.len() as i32);
        }
        let n = ids.len();
        let last_rows: Vec<usize> = cu.windows(2).filter(|w| w[1] > w[0]).map(|w| w[1] as usize - 1).collect();
        let tape = Tape::new();
        // Where the model runs: boundaries and the cache go there, ids to the embedding table's device; positions
        // stay on the host (rope tables).
        let device = self.compute_device();
        let run = || -> qlora_runtime::Result<Tensor> {
            let ids = Tensor::from_vec(ids, &[n])?.to_device(self.embed_tokens.value().device())?;
            let positions = Tensor::from_vec(positions, &[n])?;
            let cu = SeqLens::new(&cu, device)?;
            let hidden = self.forward_hidden(&tape, &ids, &positions, &cu, Some(&mut *cache), 0)?;
            let rows = match which {
                LogitsFor::All => hidden,
                LogitsFor::Last => {
                    // A row gather where the hidden states are (the embedding lookup is one).
                    let last: Vec<i32> = last_rows.iter().map(|&r| r as i32).collect();
                    let at = Tensor::from_vec(last, &[last_rows.len()])?.to_device(device)?;
                    Var::constant(embedding(hidden.value(), &at)?)
                }
            };
            Ok(self.head(&tape, &rows)?.value().clone())
        };
        match tape.no_grad(run) {
            Ok(logits) => Ok(logits),
            Err(e) => {
                cache.truncate(&before);
                Err(e.into())
            }
        }
    }
}

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub enum Sampling {
    /// The most likely token (the lowest id among ties, as torch's argmax).
    Greedy,
    /// Logits ÷ temperature, then top-k, then top-p (transformers' warper order), then a draw from the
    /// renormalised distribution with `Rng::new(seed)`.
    Random { temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64 },
}

impl Sampling {
    /// The sampling a model folder's generation_config.json asks for, with transformers' defaults (temperature
    /// 1, top-k 50, top-p 1) for what it leaves out; greedy unless `do_sample` is true.
    pub fn from_generation_config(g: &GenerationConfig, seed: u64) -> Self {
        if g.do_sample != Some(true) {
            return Sampling::Greedy;
        }
        Sampling::Random {
            temperature: g.temperature.unwrap_or(1.0),
            top_k: Some(g.top_k.unwrap_or(50)).filter(|&k| k > 0),
            top_p: g.top_p.filter(|&p| p < 1.0),
            seed,
        }
    }
}

/// Picks tokens from logits rows according to a [`Sampling`], holding the random stream between calls.
pub struct Sampler {
    sampling: Sampling,
    rng: Rng,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Result<Self> {
        let seed = match &sampling {
            Sampling::Greedy => 0,
            Sampling::Random { temperature, top_k, top_p, seed } => {
                if !(temperature.is_finite() && *temperature > 0.0) {
                    return Err(invalid(format!("temperature must be a positive number, got {temperature}")));
                }
                if *top_k == Some(0) {
                    return Err(invalid("top-k must be at least 1"));
                }
                if let Some(p) = top_p {
                    if !(*p > 0.0 && *p <= 1.0) {
                        return Err(invalid(format!("top-p must be in (0, 1], got {p}")));
                    }
                }
                *seed
            }
        };
        Ok(Sampler { sampling, rng: Rng::new(seed) })
    }

    /// The next token given one row of logits \[vocab\].
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            let best = logits.iter().enumerate().fold(0, |b, (i, &x)| if x > logits[b] { i } else { b });
            best as u32
        };
        let Sampling::Random { temperature, top_k, top_p, .. } = self.sampling else { return argmax() };
        // Candidates by descending logit, ties by ascending id.
        let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = top_k.filter(|&k| k < order.len()) {
            // transformers keeps every token tied with the k-th.
            let kth = logits[order[k - 1]];
            order.retain(|&i| logits[i] >= kth);
        }
        let Some(&first) = order.first() else { return argmax() };
        let max = logits[first] as f64;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / temperature).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = top_p {
            // The smallest prefix whose mass reaches p (at least one token).
            let mut mass = 0.0;
            let keep = probs.iter().take_while(|&&q| {
                let before = mass;
                mass += q;
                before < p
            });
            let keep = keep.count().max(1);
            order.truncate(keep);
            probs.truncate(keep);
            let total: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|q| *q /= total);
        }
        let u = self.rng.uniform();
        let mut acc = 0.0;
        for (&i, &q) in order.iter().zip(&probs) {
            acc += q;
            if u < acc {
                return i as u32;
            }
        }
        // Rounding left the total a hair below u.
        *order.last().expect("at least one candidate") as u32
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Tokens that end generation (not returned, not streamed).
    pub stop_tokens: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    StopToken(u32),
    MaxNewTokens,
    /// The sequence reached the model's max_position_embeddings.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The new tokens, without the prompt and without a stop token.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Continues `prompt`, calling `on_token` with each new token as soon as it is chosen (return
/// `ControlFlow::Break` to stop early).
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty (it needs at least a BOS token)"));
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() > context {
        return Err(invalid(format!(
            "the prompt has {} tokens; the model's context (max_position_embeddings) is {context}",
            prompt.len()
        )));
    }
    let mut sampler = Sampler::new(options.sampling.clone())?;
    let mut cache = KvCache::new(&model.config, 1);
    let mut tokens = Vec::new();
    let mut input = prompt.to_vec();
    let stop = loop {
        if tokens.len() == options.max_new_tokens {
            break StopReason::MaxNewTokens;
        }
        if cache.seq_len(0) + input.len() > context {
            break StopReason::ContextFull;
        }
        // One read back per token: the logits row the sampler draws from.
        let logits = model.forward_cached(&mut cache, &[&input], LogitsFor::Last)?.to_device(Device::Cpu)?;
        let next = sampler.sample(&logits.values::<f32>());
        if options.stop_tokens.contains(&next) {
            break StopReason::StopToken(next);
        }
        tokens.push(next);
        if on_token(next).is_break() {
            break StopReason::Cancelled;
        }
        input = vec![next];
    };
    Ok(Generation { tokens, stop })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(sampling_seed: u64, temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampler {
        Sampler::new(Sampling::Random { temperature, top_k, top_p, seed: sampling_seed }).unwrap()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(Sampling::Greedy).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_candidates() {
        let logits = [2.0f32, 1.0, 0.5, 3.0, -4.0];
        let draws = |mut s: Sampler| -> Vec<u32> { (0..400).map(|_| s.sample(&logits)).collect() };
        let only = |d: &[u32], allowed: &[u32]| d.iter().all(|t| allowed.contains(t));
        assert!(only(&draws(random(1, 1.0, Some(1), None)), &[3]));
        let d = draws(random(2, 1.0, Some(2), None));
        assert!(only(&d, &[3, 0]) && d.contains(&0) && d.contains(&3));
        // softmax(3, 2, 1, 0.5, −4) ≈ 0.63, 0.23, ...: p = 0.6 keeps token 3 alone, p = 0.7 adds token 0.
        assert!(only(&draws(random(3, 1.0, None, Some(0.6))), &[3]));
        assert!(only(&draws(random(4, 1.0, None, Some(0.7))), &[3, 0]));
        // A low temperature concentrates the mass on the maximum; a high one spreads it over all five.
        assert!(only(&draws(random(5, 0.01, None, None)), &[3]));
        let mut seen = draws(random(6, 100.0, None, None));
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen, vec![0, 1, 2, 3, 4]);
        assert_eq!(draws(random(7, 1.0, None, None)), draws(random(7, 1.0, None, None)));
    }

    #[test]
    fn bad_sampling_parameters_are_errors() {
        for (t, k, p) in [(0.0, None, None), (f64::NAN, None, None), (1.0, Some(0), None), (1.0, None, Some(0.0))] {
            let r = Sampler::new(Sampling::Random { temperature: t, top_k: k, top_p: p, seed: 0 });
            assert!(r.is_err(), "{t} {k:?} {p:?}");
        }
    }

    #[test]
    fn generation_config_defaults_follow_transformers() {
        let mut g = GenerationConfig::default();
        assert_eq!(Sampling::from_generation_config(&g, 9), Sampling::Greedy);
        g.do_sample = Some(true);
        g.top_p = Some(0.9);
        assert_eq!(
            Sampling::from_generation_config(&g, 9),
            Sampling::Random { temperature: 1.0, top_k: Some(50), top_p: Some(0.9), seed: 9 }
        );
    }
}
