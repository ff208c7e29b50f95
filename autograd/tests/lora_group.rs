//! `Tape::lora_linear_group`, the adapted linears of projections sharing an input (q/k/v, gate/up) as one op: values
//! against an f64 transcription of peft's forward, every gradient against central differences (odd shapes, ranks
//! differing per projection, projections without adapter or bias, dropout on some or all, dense and NF4 bases), and
//! equality with separate `lora_linear` calls: outputs, gradients, dropout masks, checkpoint recomputation, unused
//! outputs, frozen adapters and what backward keeps.

use qlora_autograd::{LoraAdapter, LoraConfig, LoraInit, LoraProjection, Param, Tape, Var};
use qlora_runtime::quant::{BaseWeight, Nf4Weight};
use qlora_runtime::testing::{assert_close, check_gradient, dot, Tolerance};
use qlora_runtime::{DType, Rng, Tensor};

/// One projection of a test group: its shape, adapter config (None: plain base) and whether it has a bias.
#[derive(Clone)]
struct Spec {
    out_f: usize,
    adapter: Option<LoraConfig>,
    bias: bool,
}

fn lora(r: usize, alpha: f64, use_rslora: bool, dropout: f64) -> Option<LoraConfig> {
    Some(LoraConfig { r, alpha, use_rslora, use_dora: false, dropout, init: LoraInit::Default })
}

/// A group's values: x [leading.., in], and per projection W, bias, A, B (all f64, or as `dtype` asks).
#[derive(Clone)]
struct Group {
    specs: Vec<Spec>,
    bases: Vec<BaseWeight>,
    x: Tensor,
    /// Per projection: bias, A, B when it has them.
    bias: Vec<Option<Tensor>>,
    a: Vec<Option<Tensor>>,
    b: Vec<Option<Tensor>>,
    seeds: Vec<u64>,
}

impl Group {
    fn new(specs: &[Spec], x_shape: &[usize], nf4: bool, dtype: DType, rng: &mut Rng) -> Group {
        let in_f = *x_shape.last().unwrap();
        let bases = specs
            .iter()
            .map(|s| {
                let w = Tensor::randn(&[s.out_f, in_f], 0.5, DType::F64, rng);
                if nf4 {
                    BaseWeight::Nf4(Nf4Weight::quantize(&w.to_dtype(DType::F32), 32, true).unwrap())
                } else {
                    BaseWeight::Dense(w.to_dtype(dtype))
                }
            })
            .collect();
        let mut t = |shape: &[usize], std: f64| Tensor::randn(shape, std, dtype, rng);
        let x = t(x_shape, 1.0);
        let bias = specs.iter().map(|s| s.bias.then(|| t(&[s.out_f], 1.0))).collect();
        let a = specs.iter().map(|s| s.adapter.as_ref().map(|c| t(&[c.r, in_f], 0.5))).collect();
        let b = specs.iter().map(|s| s.adapter.as_ref().map(|c| t(&[s.out_f, c.r], 0.5))).collect();
        let seeds = (0..specs.len() as u64).map(|i| 0x5EED + 977 * i).collect();
        Group { specs: specs.to_vec(), bases, x, bias, a, b, seeds }
    }

    /// Trainable parameters holding this group's values (x included, as a parameter, so its gradient is kept).
    fn params(&self) -> Params {
        let p = |name: String, t: &Tensor| Param::trainable(name, t.clone());
        let opt = |what: &str, ts: &[Option<Tensor>]| {
            ts.iter().enumerate().map(|(i, t)| t.as_ref().map(|t| p(format!("p{i}.{what}"), t))).collect()
        };
        let adapters = self
            .specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.adapter.as_ref().map(|c| LoraAdapter {
                    lora_a: p(format!("p{i}.lora_A.weight"), self.a[i].as_ref().unwrap()),
                    lora_b: p(format!("p{i}.lora_B.weight"), self.b[i].as_ref().unwrap()),
                    magnitude: None,
                    config: c.clone(),
                })
            })
            .collect();
        Params { x: p("x".into(), &self.x), bias: opt("bias", &self.bias), adapters }
    }

    /// The group's projections with these biases and adapters, each with its dropout seed.
    fn projections<'a>(
        &'a self,
        bias: &'a [Option<Var>],
        adapters: &'a [Option<LoraAdapter>],
    ) -> Vec<LoraProjection<'a>> {
        (0..self.specs.len())
            .map(|i| LoraProjection {
                base: &self.bases[i],
                bias: bias[i].as_ref(),
                adapter: adapters[i].as_ref(),
                dropout_seed: self.seeds[i],
            })
            .collect()
    }
}

struct Params {
    x: Param,
    bias: Vec<Option<Param>>,
    adapters: Vec<Option<LoraAdapter>>,
}

impl Params {
    /// Every parameter, in a fixed order: x, then per projection bias, A, B.
    fn all(&self) -> Vec<&Param> {
        let mut all = vec![&self.x];
        for (bias, ad) in self.bias.iter().zip(&self.adapters) {
            all.extend(bias.iter());
            all.extend(ad.iter().flat_map(|ad| [&ad.lora_a, &ad.lora_b]));
        }
        all
    }

    /// The group's outputs, grouped or as separate `lora_linear` calls.
    fn forward(&self, t: &Tape, g: &Group, grouped: bool) -> Vec<Var> {
        let x = t.param(&self.x);
        let bias: Vec<Option<Var>> = self.bias.iter().map(|b| b.as_ref().map(|b| t.param(b))).collect();
        let projections = g.projections(&bias, &self.adapters);
        if grouped {
            t.lora_linear_group(&x, &projections).unwrap()
        } else {
            projections.iter().map(|p| t.lora_linear(&x, p.base, p.bias, p.adapter, p.dropout_seed).unwrap()).collect()
        }
    }
}

/// Σᵢ ⟨yᵢ, gᵢ⟩ through the group, on a fresh tape with `values` (in `Params::all` order) as constants.
fn loss(g: &Group, values: &[Tensor], gs: &[Tensor]) -> f64 {
    let mut g = g.clone();
    let mut it = values.iter().cloned();
    g.x = it.next().unwrap();
    for i in 0..g.specs.len() {
        if g.bias[i].is_some() {
            g.bias[i] = it.next();
        }
        if g.a[i].is_some() {
            g.a[i] = it.next();
            g.b[i] = it.next();
        }
    }
    let params = g.params();
    let tape = Tape::new();
    let ys = tape.no_grad(|| params.forward(&tape, &g, true));
    ys.iter().zip(gs).map(|(y, g)| dot(&y.value().to_vec::<f64>(), &g.to_vec::<f64>())).sum()
}

/// peft's forward per projection in f64: x·Wᵀ + bias + s·(x_d·Aᵀ)·Bᵀ with x_d = x ⊙ the projection's mask.
fn reference(g: &Group) -> Vec<Vec<f64>> {
    let x = g.x.to_vec::<f64>();
    let in_f = *g.x.shape().last().unwrap();
    let rows = x.len() / in_f;
    (0..g.specs.len())
        .map(|i| {
            let out_f = g.specs[i].out_f;
            let w = g.bases[i].materialize(DType::F64).unwrap().to_vec::<f64>();
            let bias = g.bias[i].as_ref().map(|b| b.to_vec::<f64>()).unwrap_or(vec![0.0; out_f]);
            let mut y = vec![0.0; rows * out_f];
            for row in 0..rows {
                for j in 0..out_f {
                    y[row * out_f + j] = bias[j] + (0..in_f).map(|k| x[row * in_f + k] * w[j * in_f + k]).sum::<f64>();
                }
            }
            if let Some(c) = &g.specs[i].adapter {
                let (a, b, r) =
                    (g.a[i].as_ref().unwrap().to_vec::<f64>(), g.b[i].as_ref().unwrap().to_vec::<f64>(), c.r);
                let mut rng = Rng::new(g.seeds[i]);
                let xd: Vec<f64> = x
                    .iter()
                    .map(|&v| {
                        let keep = c.dropout == 0.0 || rng.uniform() >= c.dropout;
                        if keep {
                            v / (1.0 - c.dropout)
                        } else {
                            0.0
                        }
                    })
                    .collect();
                for row in 0..rows {
                    let u: Vec<f64> =
                        (0..r).map(|q| (0..in_f).map(|k| xd[row * in_f + k] * a[q * in_f + k]).sum()).collect();
                    for j in 0..out_f {
                        y[row * out_f + j] += c.scaling() * (0..r).map(|q| u[q] * b[j * r + q]).sum::<f64>();
                    }
                }
            }
            y
        })
        .collect()
}

/// [`specs`]' qkv group without dropout, on an input of `x_shape`.
fn qkv_group(x_shape: &[usize], nf4: bool, dtype: DType, rng: &mut Rng) -> Group {
    let (_, specs) = specs().remove(1);
    Group::new(&specs, x_shape, nf4, dtype, rng)
}

/// The groups the tests run: ranks differing per projection, odd sizes, projections without adapter or bias, rsLoRA,
/// and dropout on none, some or all of them (masks per projection, so lanes split).
fn specs() -> Vec<(&'static str, Vec<Spec>)> {
    let s = |out_f, adapter, bias| Spec { out_f, adapter, bias };
    vec![
        ("one projection", vec![s(5, lora(3, 6.0, false, 0.0), true)]),
        (
            "qkv, no dropout",
            vec![
                s(5, lora(3, 6.0, false, 0.0), true),
                s(3, lora(2, 4.0, true, 0.0), false),
                s(4, lora(1, 2.0, false, 0.0), true),
            ],
        ),
        (
            "qkv, dropout on k",
            vec![
                s(5, lora(3, 6.0, false, 0.0), false),
                s(3, lora(2, 4.0, false, 0.3), true),
                s(4, lora(4, 2.0, false, 0.0), false),
            ],
        ),
        ("gate/up, dropout on both", vec![s(6, lora(2, 3.0, false, 0.25), false), s(6, lora(3, 3.0, true, 0.5), true)]),
        (
            "an unadapted projection between two",
            vec![s(4, lora(2, 5.0, false, 0.0), true), s(3, None, true), s(2, lora(3, 1.0, false, 0.0), false)],
        ),
    ]
}

#[test]
fn group_values_and_gradients_match_the_reference_and_finite_differences() {
    let mut rng = Rng::new(21);
    for (name, specs) in specs() {
        for (x_shape, nf4) in [(vec![2, 3, 7], false), (vec![5, 9], true)] {
            let what = format!("{name}, x {x_shape:?}{}", if nf4 { ", nf4" } else { "" });
            let g = Group::new(&specs, &x_shape, nf4, DType::F64, &mut rng);
            let params = g.params();
            let tape = Tape::new();
            let ys = params.forward(&tape, &g, true);
            for (i, (y, want)) in ys.iter().zip(reference(&g)).enumerate() {
                let mut shape = x_shape.clone();
                *shape.last_mut().unwrap() = specs[i].out_f;
                assert_eq!(y.shape(), &shape[..], "{what}: output {i} shape");
                assert_close(
                    &format!("{what}: output {i}"),
                    &y.value().to_vec::<f64>(),
                    &want,
                    Tolerance { abs: 1e-12, rel: 1e-12 },
                );
            }
            let gs: Vec<Tensor> = ys.iter().map(|y| Tensor::randn(y.shape(), 1.0, DType::F64, &mut rng)).collect();
            backward_of_weighted_sum(&tape, &ys, &gs);
            assert_eq!(tape.saved_bytes().current(), 0, "{what}: backward must release every saved tensor");

            let all = params.all();
            let values: Vec<Tensor> = all.iter().map(|p| p.value()).collect();
            for (j, p) in all.iter().enumerate() {
                let grad = p.grad().unwrap_or_else(|| panic!("{what}: no gradient for {}", p.name()));
                assert_eq!(grad.shape(), p.value().shape(), "{what}: {}", p.name());
                let v0 = values[j].to_vec::<f64>();
                check_gradient(&format!("{what}: {}", p.name()), &v0, &grad.to_vec::<f64>(), |v| {
                    let mut vs = values.clone();
                    vs[j] = Tensor::from_slice(v, values[j].shape()).unwrap();
                    loss(&g, &vs, &gs)
                });
            }
        }
    }
}

/// A run's outputs and its gradients (in `Params::all` order).
/// Backward of Σᵢ sum(ysᵢ ⊙ upstreamᵢ): each output's gradient is its upstream tensor.
fn backward_of_weighted_sum(tape: &Tape, ys: &[Var], upstream: &[Tensor]) {
    let terms: Vec<Var> = ys
        .iter()
        .zip(upstream)
        .map(|(y, u)| tape.sum(&tape.mul(y, &Var::constant(u.clone())).unwrap()).unwrap())
        .collect();
    let total = terms[1..].iter().fold(terms[0].clone(), |acc, t| tape.add(&acc, t).unwrap());
    tape.backward(&total).unwrap();
}

type Run = (Vec<Vec<f64>>, Vec<Vec<f64>>);

/// Outputs and gradients of the group and of separate `lora_linear` calls, in the given dtype.
fn run_both(g: &Group, upstream: &[Tensor]) -> [Run; 2] {
    [true, false].map(|grouped| {
        let params = g.params();
        let tape = Tape::new();
        let ys = params.forward(&tape, g, grouped);
        backward_of_weighted_sum(&tape, &ys, upstream);
        let outs = ys.iter().map(|y| y.value().to_vec::<f64>()).collect();
        let grads =
            params.all().iter().map(|p| p.grad().expect("every parameter gets a gradient").to_vec::<f64>()).collect();
        (outs, grads)
    })
}

#[test]
fn group_equals_separate_projections() {
    let mut rng = Rng::new(22);
    for (name, specs) in specs() {
        for (dtype, tol) in [(DType::F64, Tolerance { abs: 1e-12, rel: 1e-12 }), (DType::F32, Tolerance::F32)] {
            for nf4 in [false, true] {
                let what = format!("{name}, {dtype:?}{}", if nf4 { ", nf4" } else { "" });
                let g = Group::new(&specs, &[33, 64], nf4, dtype, &mut rng);
                let upstream: Vec<Tensor> =
                    specs.iter().map(|s| Tensor::randn(&[33, s.out_f], 1.0, dtype, &mut rng)).collect();
                let [grouped, separate] = run_both(&g, &upstream);
                for (i, (a, b)) in grouped.0.iter().zip(&separate.0).enumerate() {
                    assert_close(&format!("{what}: output {i}"), a, b, tol);
                }
                let names: Vec<String> = g.params().all().iter().map(|p| p.name().to_string()).collect();
                for ((a, b), n) in grouped.1.iter().zip(&separate.1).zip(&names) {
                    // Gradients are sums over the 33 rows (and dx over the group's terms): a few more roundings.
                    let tol = Tolerance { abs: 8.0 * tol.abs, rel: 8.0 * tol.rel };
                    assert_close(&format!("{what}: d{n}"), a, b, tol);
                }
            }
        }
    }
}

/// A DoRA adapter in a group sends the whole group through separate calls: bit for bit the same.
#[test]
fn group_with_dora_runs_as_separate_calls() {
    let mut rng = Rng::new(23);
    let specs = vec![
        Spec { out_f: 5, adapter: lora(2, 4.0, false, 0.0), bias: false },
        Spec {
            out_f: 3,
            adapter: Some(LoraConfig { use_dora: true, ..lora(3, 6.0, false, 0.0).unwrap() }),
            bias: true,
        },
    ];
    let g = Group::new(&specs, &[6, 16], false, DType::F32, &mut rng);
    let params = g.params();
    let m = Tensor::from_vec((0..3).map(|i| 0.5 + i as f32).collect::<Vec<f32>>(), &[3]).unwrap();
    let mut ads = params.adapters.clone();
    ads[1].as_mut().unwrap().magnitude = Some(Param::trainable("p1.lora_magnitude_vector", m));
    let with_m = Params { x: params.x.clone(), bias: params.bias.clone(), adapters: ads };
    let run = |grouped| {
        let tape = Tape::new();
        with_m.forward(&tape, &g, grouped).iter().map(|y| y.value().to_vec::<f32>()).collect::<Vec<_>>()
    };
    assert_eq!(run(true), run(false));
}

/// An output no loss reads gets no gradient, and neither do its adapter's parameters (as with a separate call, which
/// backward would never reach); the others' gradients are those of the full group.
#[test]
fn unused_outputs_leave_their_adapters_without_gradient() {
    let mut rng = Rng::new(24);
    let g = qkv_group(&[10, 8], true, DType::F64, &mut rng);
    let params = g.params();
    let tape = Tape::new();
    let ys = params.forward(&tape, &g, true);
    let loss = tape.add(&tape.sum(&ys[0]).unwrap(), &tape.sum(&ys[2]).unwrap()).unwrap();
    tape.backward(&loss).unwrap();
    let unused = params.adapters[1].as_ref().unwrap();
    assert!(unused.lora_a.grad().is_none() && unused.lora_b.grad().is_none());

    let separate = g.params();
    let tape = Tape::new();
    let ys = separate.forward(&tape, &g, false);
    let loss = tape.add(&tape.sum(&ys[0]).unwrap(), &tape.sum(&ys[2]).unwrap()).unwrap();
    tape.backward(&loss).unwrap();
    for (p, q) in params.all().iter().zip(separate.all()) {
        match (p.grad(), q.grad()) {
            (Some(a), Some(b)) => {
                assert_close(p.name(), &a.to_vec::<f64>(), &b.to_vec::<f64>(), Tolerance { abs: 1e-12, rel: 1e-12 })
            }
            (None, None) => {}
            (a, b) => panic!("{}: grouped {:?} vs separate {:?}", p.name(), a.is_some(), b.is_some()),
        }
    }
}

/// Inside a checkpoint scope the group is recomputed in backward: the same gradients to the bit, dropout included.
#[test]
fn checkpoint_recompute_gives_bit_identical_gradients() {
    let mut rng = Rng::new(25);
    let (_, specs) = specs().remove(2);
    let g = Group::new(&specs, &[12, 32], true, DType::F32, &mut rng);
    let upstream: Vec<Tensor> =
        specs.iter().map(|s| Tensor::randn(&[12, s.out_f], 1.0, DType::F32, &mut rng)).collect();
    let mut runs = Vec::new();
    for checkpointed in [false, true] {
        let params = g.params();
        let tape = Tape::new();
        let x = tape.param(&params.x);
        let ys = if checkpointed {
            let (g, adapters, bias) = (g.clone(), params.adapters.clone(), params.bias.clone());
            tape.checkpoint(&[&x], move |t, v| {
                let bias: Vec<Option<Var>> = bias.iter().map(|b| b.as_ref().map(|b| t.param(b))).collect();
                t.lora_linear_group(&v[0], &g.projections(&bias, &adapters))
            })
            .unwrap()
        } else {
            params.forward(&tape, &g, true)
        };
        backward_of_weighted_sum(&tape, &ys, &upstream);
        let grads: Vec<Vec<f32>> = params.all().iter().map(|p| p.grad().unwrap().to_vec::<f32>()).collect();
        runs.push((ys.iter().map(|y| y.value().to_vec::<f32>()).collect::<Vec<_>>(), grads));
    }
    assert_eq!(runs[0], runs[1]);
}

/// What the group keeps for backward: x once (not per projection), the group's U and stacked A, each B; nothing of
/// the bases' size. Frozen adapters and an input without gradient record nothing.
#[test]
fn group_saves_x_once_and_nothing_of_weight_size() {
    let mut rng = Rng::new(26);
    let (tokens, in_f) = (4, 64);
    let g = qkv_group(&[tokens, in_f], true, DType::F32, &mut rng);
    let params = g.params();
    let tape = Tape::new();
    let ys = params.forward(&tape, &g, true);
    let r: usize = g.specs.iter().filter_map(|s| s.adapter.as_ref()).map(|c| c.r).sum();
    let b: usize = g.specs.iter().filter_map(|s| Some(s.out_f * s.adapter.as_ref()?.r)).sum();
    assert_eq!(tape.saved_bytes().current(), 4 * (tokens * in_f + tokens * r + r * in_f + b));
    let loss =
        ys.iter().skip(1).fold(tape.sum(&ys[0]).unwrap(), |acc, y| tape.add(&acc, &tape.sum(y).unwrap()).unwrap());
    tape.backward(&loss).unwrap();
    assert_eq!(tape.saved_bytes().current(), 0);

    let frozen: Vec<Option<LoraAdapter>> = params
        .adapters
        .iter()
        .map(|ad| {
            ad.as_ref().map(|ad| LoraAdapter {
                lora_a: Param::frozen(ad.lora_a.name(), ad.lora_a.value()),
                lora_b: Param::frozen(ad.lora_b.name(), ad.lora_b.value()),
                ..ad.clone()
            })
        })
        .collect();
    let tape = Tape::new();
    let x = Var::constant(g.x.clone());
    let ys = tape.lora_linear_group(&x, &g.projections(&vec![None; g.specs.len()], &frozen)).unwrap();
    assert!(ys.iter().all(|y| !y.requires_grad()));
    assert_eq!(tape.saved_bytes().peak(), 0);
}

#[test]
fn group_errors_name_the_tensor() {
    let mut rng = Rng::new(27);
    let g = qkv_group(&[3, 8], false, DType::F32, &mut rng);
    let params = g.params();
    let other = BaseWeight::Dense(Tensor::zeros(&[4, 9], DType::F32));
    let tape = Tape::new();
    let x = Var::constant(g.x.clone());
    let err = |ps: &[LoraProjection]| tape.lora_linear_group(&x, ps).unwrap_err().to_string();
    let p = |i: usize| LoraProjection {
        base: &g.bases[i],
        bias: None,
        adapter: params.adapters[i].as_ref(),
        dropout_seed: 0,
    };
    let e = err(&[p(0), LoraProjection { base: &other, ..p(1) }]);
    assert!(e.contains("[4, 9]") && e.contains("[3, 8]"), "{e}");
    let e = err(&[p(0), LoraProjection { base: &g.bases[0], ..p(1) }]);
    assert!(e.contains("p1.lora_B.weight"), "{e}");
    assert!(err(&[]).contains("no projections"));
    assert_eq!(tape.saved_bytes().peak(), 0);
}

/// A group after a norm, told so (`lora_linear_group_of`), keeps the norm's input instead of its output and forms the
/// output again in backward: the same values and gradients bit for bit, with and without dropout, for Llama's norm
/// and Gemma's (1 + w), through x into the norm's input; a norm input of another shape is an error.
#[test]
fn a_group_after_a_norm_keeps_its_input_with_the_same_bits() {
    use qlora_autograd::NormOf;
    let mut rng = Rng::new(31);
    let specs = [
        Spec { out_f: 7, adapter: lora(3, 6.0, false, 0.0), bias: false },
        Spec { out_f: 5, adapter: lora(2, 2.0, false, 0.3), bias: true },
        Spec { out_f: 4, adapter: lora(4, 4.0, false, 0.0), bias: false },
    ];
    let g = Group::new(&specs, &[2, 5, 12], true, DType::F32, &mut rng);
    let weight = Tensor::randn(&[12], 0.5, DType::F32, &mut rng);
    for offset in [0.0, 1.0] {
        let run = |told: bool| {
            let params = g.params();
            let tape = Tape::new();
            let x0 = tape.param(&params.x);
            let h = tape.rms_norm(&x0, &Var::constant(weight.clone()), 1e-6, offset).unwrap();
            let norm = told.then(|| NormOf { input: x0.value().clone(), weight: weight.clone(), eps: 1e-6, offset });
            let bias: Vec<Option<Var>> = params.bias.iter().map(|b| b.as_ref().map(|b| tape.param(b))).collect();
            let ys = tape.lora_linear_group_of(&h, norm, &g.projections(&bias, &params.adapters)).unwrap();
            let mut loss: Option<Var> = None;
            for y in &ys {
                let s = tape.sum(&tape.mul(y, y).unwrap()).unwrap();
                loss = Some(match loss {
                    Some(l) => tape.add(&l, &s).unwrap(),
                    None => s,
                });
            }
            tape.backward(&loss.unwrap()).unwrap();
            let values: Vec<Vec<f32>> = ys.iter().map(|y| y.value().to_vec::<f32>()).collect();
            let grads: Vec<Vec<f32>> = params.all().iter().map(|p| p.grad().unwrap().to_vec::<f32>()).collect();
            (values, grads)
        };
        assert!(run(true) == run(false), "offset {offset}: keeping the norm's input changed a bit");
    }
    let params = g.params();
    let tape = Tape::new();
    let x = tape.param(&params.x);
    let none: Vec<Option<Var>> = vec![None; specs.len()];
    let wrong = NormOf { input: Tensor::zeros(&[2, 12], DType::F32), weight, eps: 1e-6, offset: 0.0 };
    let err = tape.lora_linear_group_of(&x, Some(wrong), &g.projections(&none, &params.adapters)).unwrap_err();
    assert!(err.to_string().contains("norm input [2, 12] for x [2, 5, 12]"), "{err}");
}
