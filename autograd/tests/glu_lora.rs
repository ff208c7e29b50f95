//! An MLP's GLU and the adapted projection after it as one op (`Tape::glu_lora_linear`, and `_unread` in a
//! checkpoint's recompute): the two ops' values and gradients bit for bit, their product not kept, and gradients
//! against central finite differences in f64.

use qlora_autograd::{Glu, LoraAdapter, LoraConfig, LoraInit, LoraProjection, Param, Tape, Var};
use qlora_runtime::quant::{BaseWeight, Nf4Weight};
use qlora_runtime::testing::{check_gradient, dot};
use qlora_runtime::{DType, Result, Rng, Tensor};

const SEED: u64 = 0x61A;
const KINDS: [Glu; 2] = [Glu::SwiGlu, Glu::GeGlu];

fn config(use_rslora: bool, use_dora: bool, dropout: f64) -> LoraConfig {
    LoraConfig { r: 4, alpha: 8.0, use_rslora, use_dora, dropout, init: LoraInit::Default }
}

/// An adapter over `base` with B ≠ 0 (so that it contributes) and, for DoRA, m ≠ ‖W‖.
fn trained(base: &BaseWeight, cfg: &LoraConfig, rng: &mut Rng) -> LoraAdapter {
    let ad = LoraAdapter::new("down_proj", base, cfg, rng).unwrap();
    let out_f = base.shape()[0];
    ad.lora_b.set_value(Tensor::randn(&[out_f, cfg.r], 0.05, ad.lora_b.value().dtype(), rng));
    if let Some(m) = &ad.magnitude {
        let scaled: Vec<f32> = m.value().to_vec::<f32>().iter().map(|v| 0.8 * v).collect();
        m.set_value(Tensor::from_vec(scaled, &[out_f]).unwrap());
    }
    ad
}

/// How the GLU and the projection are recorded.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    /// `Tape::glu`, then `Tape::lora_linear` of its product.
    TwoOps,
    OneOp,
    /// One op in a checkpoint whose recompute records it unread.
    OneOpUnread,
}

/// What a run gives: the output, the gradients of gate, up and every parameter, and the bytes saved after forward.
type Run = (Vec<f64>, Vec<Vec<f64>>, usize);

struct Setup {
    kind: Glu,
    base: BaseWeight,
    adapter: Option<LoraAdapter>,
    bias: Param,
    gate: Tensor,
    up: Tensor,
    dy: Tensor,
}

impl Setup {
    fn params(&self) -> Vec<Param> {
        let mut ps: Vec<Param> = self.adapter.iter().flat_map(|ad| ad.params()).cloned().collect();
        ps.push(self.bias.clone());
        ps
    }

    /// The projection of act(gate) ⊙ up recorded `way` on `t` (the checkpoint's closure calls this too).
    fn record(&self, t: &Tape, gate: &Var, up: &Var, way: Way) -> Result<Var> {
        let bias = t.param(&self.bias);
        let adapter = self.adapter.as_ref();
        let p = LoraProjection { base: &self.base, bias: Some(&bias), adapter, dropout_seed: SEED };
        match way {
            Way::TwoOps => t.lora_linear(&t.glu(self.kind, gate, up)?, &self.base, Some(&bias), adapter, SEED),
            Way::OneOpUnread if t.recomputing() => t.glu_lora_linear_unread(self.kind, gate, up, p),
            _ => t.glu_lora_linear(self.kind, gate, up, p),
        }
    }

    fn run(self: &std::rc::Rc<Self>, way: Way) -> Run {
        self.params().iter().for_each(Param::zero_grad);
        let (gp, upp) = (Param::trainable("gate", self.gate.clone()), Param::trainable("up", self.up.clone()));
        let tape = Tape::new();
        let (gate, up) = (tape.param(&gp), tape.param(&upp));
        let y = if way == Way::OneOpUnread {
            let setup = self.clone();
            let outs = tape.checkpoint(&[&gate, &up], move |t, v| Ok(vec![setup.record(t, &v[0], &v[1], way)?]));
            outs.unwrap().remove(0)
        } else {
            self.record(&tape, &gate, &up, way).unwrap()
        };
        let saved = tape.saved_bytes().current();
        tape.backward(&tape.sum(&tape.mul(&y, &Var::constant(self.dy.clone())).unwrap()).unwrap()).unwrap();
        assert_eq!(tape.saved_bytes().current(), 0, "{way:?}: backward releases what it saved");
        let grads = [&gp, &upp].into_iter().chain(&self.params()).map(|p| p.grad().unwrap().to_vec::<f64>()).collect();
        (y.value().to_vec::<f64>(), grads, saved)
    }
}

fn setup(kind: Glu, base: &BaseWeight, cfg: Option<&LoraConfig>, dtype: DType, rng: &mut Rng) -> Setup {
    let [out_f, inter] = base.shape();
    let rows = 6;
    Setup {
        kind,
        base: base.clone(),
        adapter: cfg.map(|c| {
            let ad = trained(base, c, rng);
            // A and B in the activations' dtype: f64 for the finite differences.
            adapter_with(&ad, &ad.lora_a.value().to_dtype(dtype), &ad.lora_b.value().to_dtype(dtype))
        }),
        bias: Param::trainable("bias", Tensor::randn(&[out_f], 1.0, dtype, rng)),
        gate: Tensor::randn(&[rows, inter], 1.0, dtype, rng),
        up: Tensor::randn(&[rows, inter], 1.0, dtype, rng),
        dy: Tensor::randn(&[rows, out_f], 1.0, dtype, rng),
    }
}

#[test]
fn one_op_gives_the_two_ops_bits_without_keeping_the_product() {
    let mut rng = Rng::new(21);
    let w = Tensor::randn(&[10, 64], 0.1, DType::F32, &mut rng);
    let nf4 = BaseWeight::Nf4(Nf4Weight::quantize(&w, 64, true).unwrap());
    let configs =
        [None, Some(config(false, false, 0.0)), Some(config(true, false, 0.25)), Some(config(false, true, 0.0))];
    for base in [BaseWeight::Dense(w.clone()), nf4] {
        for kind in KINDS {
            for cfg in &configs {
                let s = std::rc::Rc::new(setup(kind, &base, cfg.as_ref(), DType::F32, &mut rng));
                let what = format!("{kind:?}, {cfg:?}, nf4 {}", matches!(base, BaseWeight::Nf4(_)));
                let two = s.run(Way::TwoOps);
                for way in [Way::OneOp, Way::OneOpUnread] {
                    let one = s.run(way);
                    assert_eq!(two.0, one.0, "{what}, {way:?}: output");
                    assert_eq!(two.1, one.1, "{what}, {way:?}: gradients of gate, up, A, B, m, bias");
                }
                // The product [6, 64] in f32 is what the two ops keep beyond the one op, where an adapter's dA reads
                // it (DoRA runs as the two ops).
                let plain_lora = cfg.as_ref().is_some_and(|c| !c.use_dora);
                let product = if plain_lora { 6 * 64 * 4 } else { 0 };
                assert_eq!(two.2 - s.run(Way::OneOp).2, product, "{what}: bytes kept");
            }
        }
    }
}

#[test]
fn one_op_gradients_match_finite_differences() {
    let mut rng = Rng::new(22);
    let base = BaseWeight::Dense(Tensor::randn(&[5, 7], 0.5, DType::F64, &mut rng));
    for kind in KINDS {
        for cfg in [config(false, false, 0.0), config(false, false, 0.3)] {
            let s = std::rc::Rc::new(setup(kind, &base, Some(&cfg), DType::F64, &mut rng));
            let (_, grads, _) = s.run(Way::OneOp);
            let ad = s.adapter.as_ref().unwrap();
            let g = s.dy.to_vec::<f64>();
            let loss = |gate: &Tensor, up: &Tensor, a: &Tensor, b: &Tensor| {
                let probe = adapter_with(ad, a, b);
                let t = Tape::new();
                let bias = Var::constant(s.bias.value());
                let p = LoraProjection { base: &s.base, bias: Some(&bias), adapter: Some(&probe), dropout_seed: SEED };
                let y = t.glu_lora_linear(kind, &Var::constant(gate.clone()), &Var::constant(up.clone()), p).unwrap();
                dot(&y.value().to_vec::<f64>(), &g)
            };
            let at = |t: &Tensor, v: &[f64]| Tensor::from_slice(v, t.shape()).unwrap();
            let (a, b) = (ad.lora_a.value(), ad.lora_b.value());
            let name = format!("{kind:?} dropout {}", cfg.dropout);
            check_gradient(&format!("{name}: gate"), &s.gate.to_vec::<f64>(), &grads[0], |v| {
                loss(&at(&s.gate, v), &s.up, &a, &b)
            });
            check_gradient(&format!("{name}: up"), &s.up.to_vec::<f64>(), &grads[1], |v| {
                loss(&s.gate, &at(&s.up, v), &a, &b)
            });
            check_gradient(&format!("{name}: A"), &a.to_vec::<f64>(), &grads[2], |v| {
                loss(&s.gate, &s.up, &at(&a, v), &b)
            });
            check_gradient(&format!("{name}: B"), &b.to_vec::<f64>(), &grads[3], |v| {
                loss(&s.gate, &s.up, &a, &at(&b, v))
            });
        }
    }
}

/// `ad` with A and B replaced (fresh parameters; m shared).
fn adapter_with(ad: &LoraAdapter, a: &Tensor, b: &Tensor) -> LoraAdapter {
    LoraAdapter {
        lora_a: Param::trainable("down_proj.lora_A.weight", a.clone()),
        lora_b: Param::trainable("down_proj.lora_B.weight", b.clone()),
        magnitude: ad.magnitude.clone(),
        config: ad.config.clone(),
    }
}

#[test]
fn gate_and_up_of_different_shapes_are_refused() {
    let mut rng = Rng::new(23);
    let base = BaseWeight::Dense(Tensor::randn(&[4, 8], 0.5, DType::F32, &mut rng));
    let t = Tape::new();
    let gate = Var::constant(Tensor::randn(&[3, 8], 1.0, DType::F32, &mut rng));
    let up = Var::constant(Tensor::randn(&[2, 8], 1.0, DType::F32, &mut rng));
    let p = LoraProjection { base: &base, bias: None, adapter: None, dropout_seed: SEED };
    let e = t.glu_lora_linear(Glu::SwiGlu, &gate, &up, p).unwrap_err().to_string();
    assert!(e.contains("[3, 8]") && e.contains("[2, 8]"), "{e}");
}
