//! The adapted linear (`Tape::lora_linear`): LoRA, rsLoRA and DoRA gradients against central finite differences in
//! f64, init, merge/unmerge, checkpointing, adapter switching, what backward keeps, and parity with peft's own
//! forward and backward (`tests/fixtures/peft/peft_lora.safetensors`, written by `scripts/reference/peft_fixtures.py`).

use std::collections::HashMap;
use std::path::PathBuf;

use qlora_autograd::{
    merged_weight, unmerged_weight, AdapterSet, LoraAdapter, LoraConfig, LoraInit, LoraProjection, Param, Tape, Var,
};
use qlora_runtime::quant::{BaseWeight, Nf4Weight};
use qlora_runtime::testing::{assert_close, check_gradient, dot, Tolerance};
use qlora_runtime::Rng;
use qlora_runtime::{DType, Tensor};

const SEED: u64 = 0x5EED;

fn randn(shape: &[usize], std: f64, dtype: DType, rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, std, dtype, rng)
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_vec::<f64>()
}

fn config(r: usize, alpha: f64, use_rslora: bool, use_dora: bool, dropout: f64) -> LoraConfig {
    LoraConfig { r, alpha, use_rslora, use_dora, dropout, init: LoraInit::Default }
}

/// An adapter holding the given values (trainable), named as peft names them for module `proj`.
fn adapter_from(cfg: &LoraConfig, a: Tensor, b: Tensor, m: Option<Tensor>) -> LoraAdapter {
    LoraAdapter {
        lora_a: Param::trainable("proj.lora_A.weight", a),
        lora_b: Param::trainable("proj.lora_B.weight", b),
        magnitude: m.map(|m| Param::trainable("proj.lora_magnitude_vector", m)),
        config: cfg.clone(),
    }
}

/// A plain f64 transcription of peft's forward, the oracle for the op's value and, with `n` held fixed, for the
/// detached-norm gradients of A and B under DoRA.
struct Reference {
    w: Vec<f64>,
    bias: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    m: Option<Vec<f64>>,
    s: f64,
    r: usize,
    out_f: usize,
    in_f: usize,
}

impl Reference {
    /// n = ‖W + s·B·A‖ per output row.
    fn norms(&self) -> Vec<f64> {
        (0..self.out_f)
            .map(|j| {
                (0..self.in_f)
                    .map(|k| {
                        let ba: f64 = (0..self.r).map(|q| self.b[j * self.r + q] * self.a[q * self.in_f + k]).sum();
                        let v = self.w[j * self.in_f + k] + self.s * ba;
                        v * v
                    })
                    .sum::<f64>()
                    .sqrt()
            })
            .collect()
    }

    /// y for input rows x: [rows, in], dropout as the multiplier per element (0 or 1/(1 − p)), n fixed if given.
    fn forward(&self, x: &[f64], mask: Option<&[f64]>, n: Option<&[f64]>) -> Vec<f64> {
        let (out_f, in_f, r) = (self.out_f, self.in_f, self.r);
        let rows = x.len() / in_f;
        let xd: Vec<f64> = match mask {
            Some(mk) => x.iter().zip(mk).map(|(v, k)| v * k).collect(),
            None => x.to_vec(),
        };
        let n = n.map(<[f64]>::to_vec).unwrap_or_else(|| self.norms());
        let mut y = vec![0.0; rows * out_f];
        for i in 0..rows {
            let xi = &x[i * in_f..(i + 1) * in_f];
            let xdi = &xd[i * in_f..(i + 1) * in_f];
            let u: Vec<f64> = (0..r).map(|q| (0..in_f).map(|k| xdi[k] * self.a[q * in_f + k]).sum()).collect();
            for j in 0..out_f {
                let wj = &self.w[j * in_f..(j + 1) * in_f];
                let z: f64 = (0..in_f).map(|k| xi[k] * wj[k]).sum();
                let zd: f64 = (0..in_f).map(|k| xdi[k] * wj[k]).sum();
                let sv = self.s * (0..r).map(|q| u[q] * self.b[j * r + q]).sum::<f64>();
                y[i * out_f + j] = self.bias[j]
                    + match &self.m {
                        None => z + sv,
                        Some(m) => {
                            let g = m[j] / n[j];
                            z + (g - 1.0) * zd + g * sv
                        }
                    };
            }
        }
        y
    }
}

/// The dropout multipliers the op must use: element i dropped iff the i-th uniform draw of `Rng::new(seed)` is < p.
fn mask(n: usize, p: f64, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| if rng.uniform() < p { 0.0 } else { 1.0 / (1.0 - p) }).collect()
}

struct Case {
    name: String,
    base: BaseWeight,
    x: Tensor,
    bias: Tensor,
    a: Tensor,
    b: Tensor,
    m: Option<Tensor>,
    cfg: LoraConfig,
}

impl Case {
    /// x: [2, 3, in] (leading dims flatten), B random and non-zero so the adapter contributes, m ≠ ‖W‖ so g ≠ 1.
    fn new(name: &str, cfg: LoraConfig, nf4: bool, rng: &mut Rng) -> Self {
        let (out_f, in_f, r) = (5, 7, cfg.r);
        let w = randn(&[out_f, in_f], 0.5, DType::F64, rng);
        let base = if nf4 {
            BaseWeight::Nf4(Nf4Weight::quantize(&w.to_dtype(DType::F32), 32, true).unwrap())
        } else {
            BaseWeight::Dense(w)
        };
        let m = cfg.use_dora.then(|| {
            Tensor::from_vec((0..out_f).map(|_| 0.5 + rng.uniform()).collect::<Vec<f64>>(), &[out_f]).unwrap()
        });
        Case {
            name: format!("{name}{}", if nf4 { " (nf4 base)" } else { "" }),
            base,
            x: randn(&[2, 3, in_f], 1.0, DType::F64, rng),
            bias: randn(&[out_f], 1.0, DType::F64, rng),
            a: randn(&[r, in_f], 0.5, DType::F64, rng),
            b: randn(&[out_f, r], 0.5, DType::F64, rng),
            m,
            cfg,
        }
    }

    fn reference(&self, a: &Tensor, b: &Tensor, m: Option<&Tensor>) -> Reference {
        let [out_f, in_f] = self.base.shape();
        Reference {
            w: f64s(&self.base.materialize(DType::F64).unwrap()),
            bias: f64s(&self.bias),
            a: f64s(a),
            b: f64s(b),
            m: m.map(f64s),
            s: self.cfg.scaling(),
            r: self.cfg.r,
            out_f,
            in_f,
        }
    }

    fn mask(&self) -> Option<Vec<f64>> {
        (self.cfg.dropout > 0.0).then(|| mask(self.x.elem_count(), self.cfg.dropout, SEED))
    }

    /// Σ lora_linear(inputs) ⊙ g on a fresh tape, all inputs constants.
    fn loss(&self, x: &Tensor, bias: &Tensor, a: &Tensor, b: &Tensor, m: Option<&Tensor>, g: &[f64]) -> f64 {
        let ad = adapter_from(&self.cfg, a.clone(), b.clone(), m.cloned());
        let tape = Tape::new();
        let (x, bias) = (Var::constant(x.clone()), Var::constant(bias.clone()));
        let y = tape.lora_linear(&x, &self.base, Some(&bias), Some(&ad), SEED).unwrap();
        dot(&f64s(y.value()), g)
    }

    /// Checks the value against the reference, then every gradient against central differences.
    fn check(&self) {
        let name = &self.name;
        let ad = adapter_from(&self.cfg, self.a.clone(), self.b.clone(), self.m.clone());
        let (xp, bp) = (Param::trainable("x", self.x.clone()), Param::trainable("bias", self.bias.clone()));
        let tape = Tape::new();
        let y = tape.lora_linear(&tape.param(&xp), &self.base, Some(&tape.param(&bp)), Some(&ad), SEED).unwrap();
        let reference = self.reference(&self.a, &self.b, self.m.as_ref());
        let mask = self.mask();
        let expect = reference.forward(&f64s(&self.x), mask.as_deref(), None);
        assert_eq!(y.shape(), &[2, 3, 5], "{name}: output shape");
        assert_close(&format!("{name}: forward"), &f64s(y.value()), &expect, Tolerance { abs: 1e-12, rel: 1e-12 });

        let g = randn(y.shape(), 1.0, DType::F64, &mut Rng::new(7));
        let gv = f64s(&g);
        tape.backward(&tape.sum(&tape.mul(&y, &Var::constant(g)).unwrap()).unwrap()).unwrap();
        assert_eq!(tape.saved_bytes().current(), 0, "{name}: backward must release every saved tensor");
        let grad = |p: &Param, what: &str| f64s(&p.grad().unwrap_or_else(|| panic!("{name}: no gradient for {what}")));

        let (x, bias, a, b, m) = (&self.x, &self.bias, &self.a, &self.b, self.m.as_ref());
        let at = |t: &Tensor, v: &[f64]| Tensor::from_slice(v, t.shape()).unwrap();
        check_gradient(&format!("{name}: x"), &f64s(x), &grad(&xp, "x"), |v| self.loss(&at(x, v), bias, a, b, m, &gv));
        check_gradient(&format!("{name}: bias"), &f64s(bias), &grad(&bp, "bias"), |v| {
            self.loss(x, &at(bias, v), a, b, m, &gv)
        });
        if let (Some(m), Some(mp)) = (m, &ad.magnitude) {
            check_gradient(&format!("{name}: m"), &f64s(m), &grad(mp, "m"), |v| {
                self.loss(x, bias, a, b, Some(&at(m, v)), &gv)
            });
        }
        // DoRA's norm is detached (peft, and the DoRA paper §4.3): A's and B's gradients are those of the function
        // with n held at its current value, which only the reference can evaluate.
        let n0 = reference.norms();
        let frozen_n = |a: &Tensor, b: &Tensor| {
            let r = self.reference(a, b, m);
            dot(&r.forward(&f64s(x), mask.as_deref(), Some(&n0)), &gv)
        };
        let dora = m.is_some();
        check_gradient(&format!("{name}: A"), &f64s(a), &grad(&ad.lora_a, "A"), |v| {
            if dora {
                frozen_n(&at(a, v), b)
            } else {
                self.loss(x, bias, &at(a, v), b, m, &gv)
            }
        });
        check_gradient(&format!("{name}: B"), &f64s(b), &grad(&ad.lora_b, "B"), |v| {
            if dora {
                frozen_n(a, &at(b, v))
            } else {
                self.loss(x, bias, a, &at(b, v), m, &gv)
            }
        });
    }
}

#[test]
fn gradients_match_finite_differences() {
    let mut rng = Rng::new(1);
    for nf4 in [false, true] {
        for dropout in [0.0, 0.3] {
            for (name, rs, dora) in [("lora", false, false), ("rslora", true, false), ("dora", false, true)] {
                let cfg = config(3, 6.0, rs, dora, dropout);
                Case::new(&format!("{name} dropout {dropout}"), cfg, nf4, &mut rng).check();
            }
        }
    }
}

#[test]
fn dora_norm_is_detached_like_peft() {
    // The gradient of A with n detached differs from the gradient of the full function: were the op to let a
    // gradient through n, the finite-difference check above would have failed against the frozen-n reference, and
    // this guards against a reference that accidentally agrees with both.
    let mut rng = Rng::new(2);
    let case = Case::new("dora", config(3, 6.0, false, true, 0.0), false, &mut rng);
    let g: Vec<f64> = (0..30).map(|_| rng.normal()).collect();
    let a0 = f64s(&case.a);
    let full = |v: &[f64]| {
        let a = Tensor::from_slice(v, case.a.shape()).unwrap();
        case.loss(&case.x, &case.bias, &a, &case.b, case.m.as_ref(), &g)
    };
    let n0 = case.reference(&case.a, &case.b, case.m.as_ref()).norms();
    let frozen = |v: &[f64]| {
        let a = Tensor::from_slice(v, case.a.shape()).unwrap();
        dot(&case.reference(&a, &case.b, case.m.as_ref()).forward(&f64s(&case.x), None, Some(&n0)), &g)
    };
    let h = 1e-6;
    let mut differs = false;
    for i in 0..a0.len() {
        let (mut up, mut down) = (a0.clone(), a0.clone());
        up[i] += h;
        down[i] -= h;
        let d_full = (full(&up) - full(&down)) / (2.0 * h);
        let d_frozen = (frozen(&up) - frozen(&down)) / (2.0 * h);
        differs |= (d_full - d_frozen).abs() > 1e-4 * (1.0 + d_full.abs());
    }
    assert!(differs, "the norm's own gradient is not negligible here, so detaching it must show");
}

#[test]
fn config_validation_and_scaling() {
    let base = BaseWeight::Dense(Tensor::ones(&[4, 6], DType::F32));
    let mut rng = Rng::new(3);
    assert_eq!(config(8, 16.0, false, false, 0.0).scaling(), 2.0);
    assert_eq!(config(8, 16.0, true, false, 0.0).scaling(), 16.0 / 8f64.sqrt());
    assert_eq!(LoraConfig::default(), config(8, 8.0, false, false, 0.0));
    for (bad, what) in [
        (config(0, 16.0, false, false, 0.0), "r must be"),
        (config(4, f64::NAN, false, false, 0.0), "alpha must be finite"),
        (config(4, f64::INFINITY, false, false, 0.0), "alpha must be finite"),
        (config(4, 8.0, false, false, 1.0), "dropout must be in [0, 1)"),
        (config(4, 8.0, false, false, -0.1), "dropout must be in [0, 1)"),
        (config(4, 8.0, false, false, f64::NAN), "dropout must be in [0, 1)"),
    ] {
        let e = LoraAdapter::new("layers.0.q_proj", &base, &bad, &mut rng).unwrap_err().to_string();
        assert!(e.contains(what) && e.contains("layers.0.q_proj"), "{e}");
    }
}

#[test]
fn init_matches_peft() {
    let mut rng = Rng::new(4);
    let (out_f, in_f) = (96, 400);
    let w = randn(&[out_f, in_f], 0.05, DType::BF16, &mut rng);
    let nf4 = BaseWeight::Nf4(Nf4Weight::quantize(&w, 64, true).unwrap());
    for base in [BaseWeight::Dense(w.clone()), nf4] {
        let cfg = config(16, 32.0, false, true, 0.05);
        let ad = LoraAdapter::new("model.layers.0.self_attn.q_proj", &base, &cfg, &mut rng).unwrap();
        let names: Vec<&str> = ad.params().iter().map(|p| p.name()).collect();
        assert_eq!(
            names,
            [
                "model.layers.0.self_attn.q_proj.lora_A.weight",
                "model.layers.0.self_attn.q_proj.lora_B.weight",
                "model.layers.0.self_attn.q_proj.lora_magnitude_vector",
            ]
        );
        for p in ad.params() {
            assert!(p.is_trainable(), "{}", p.name());
            assert_eq!(p.value().dtype(), DType::F32, "{}: f32 master weight", p.name());
        }
        // kaiming_uniform_(a=√5): U(−b, b) with b = √(6/((1 + a²)·in)) = 1/√in; variance b²/3.
        let bound = (6.0 / (6.0 * in_f as f64)).sqrt();
        assert!((bound - 1.0 / (in_f as f64).sqrt()).abs() < 1e-15);
        let a = f64s(&ad.lora_a.value());
        assert_eq!(ad.lora_a.value().shape(), &[16, in_f]);
        assert!(a.iter().all(|v| v.abs() <= bound), "A within the Kaiming bound");
        let max = a.iter().fold(0f64, |acc, v| acc.max(v.abs()));
        assert!(max > 0.99 * bound, "A fills its range: max {max} vs bound {bound}");
        let mean = a.iter().sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.02 * bound, "mean {mean}");
        assert!((var / (bound * bound / 3.0) - 1.0).abs() < 0.03, "variance {var} vs {}", bound * bound / 3.0);
        assert_eq!(ad.lora_b.value().shape(), &[out_f, 16]);
        assert!(f64s(&ad.lora_b.value()).iter().all(|&v| v == 0.0), "B starts at zero");
        // m = ‖W‖ per output row of the dequantized base.
        let wd = f64s(&base.materialize(DType::F32).unwrap());
        let norms: Vec<f64> = wd.chunks(in_f).map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt()).collect();
        let m = ad.magnitude.as_ref().expect("DoRA has a magnitude");
        assert_close("m = ‖W‖", &f64s(&m.value()), &norms, Tolerance { abs: 0.0, rel: 1e-6 });
    }
    let gauss = LoraConfig { init: LoraInit::Gaussian, ..config(8, 16.0, false, false, 0.0) };
    let base = BaseWeight::Dense(w);
    let ad = LoraAdapter::new("q_proj", &base, &gauss, &mut rng).unwrap();
    assert!(ad.magnitude.is_none());
    let a = f64s(&ad.lora_a.value());
    let std = (a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64).sqrt();
    assert!((std * 8.0 - 1.0).abs() < 0.03, "gaussian init: std {std} vs 1/r = 0.125");
}

#[test]
fn fresh_adapter_is_a_no_op() {
    // B = 0: ΔW = 0 and, for DoRA, m = n exactly (same computation), so g = 1 and every correction term is zero.
    let mut rng = Rng::new(5);
    let w = randn(&[24, 40], 0.1, DType::F32, &mut rng);
    let bias = Var::constant(randn(&[24], 1.0, DType::F32, &mut rng));
    let x = Var::constant(randn(&[3, 4, 40], 1.0, DType::F32, &mut rng));
    let nf4 = BaseWeight::Nf4(Nf4Weight::quantize(&w, 64, false).unwrap());
    for base in [BaseWeight::Dense(w.clone()), nf4] {
        let tape = Tape::new();
        let w_dense = Var::constant(base.materialize(DType::F32).unwrap());
        let plain = tape.linear(&x, &w_dense, Some(&bias)).unwrap();
        let frozen = tape.lora_linear(&x, &base, Some(&bias), None, SEED).unwrap();
        assert_eq!(frozen.value().to_vec::<f32>(), plain.value().to_vec::<f32>(), "adapter None is the base linear");
        for (dora, dropout) in [(false, 0.0), (true, 0.0), (false, 0.2), (true, 0.2)] {
            let ad = LoraAdapter::new("proj", &base, &config(8, 16.0, false, dora, dropout), &mut rng).unwrap();
            let y = tape.lora_linear(&x, &base, Some(&bias), Some(&ad), SEED).unwrap();
            assert_eq!(y.value().to_vec::<f32>(), plain.value().to_vec::<f32>(), "dora {dora}, dropout {dropout}");
        }
    }
}

#[test]
fn base_weight_never_gets_a_gradient() {
    let mut rng = Rng::new(6);
    let (out_f, in_f) = (12, 20);
    let w = Param::frozen("proj.weight", randn(&[out_f, in_f], 0.2, DType::F32, &mut rng));
    let base = BaseWeight::Dense(w.value());
    let ad = LoraAdapter::new("proj", &base, &config(4, 8.0, false, true, 0.1), &mut rng).unwrap();
    ad.lora_b.set_value(randn(&[out_f, 4], 0.1, DType::F32, &mut rng));
    let xp = Param::trainable("x", randn(&[5, in_f], 1.0, DType::F32, &mut rng));
    let bp = Param::trainable("bias", randn(&[out_f], 1.0, DType::F32, &mut rng));
    let tape = Tape::new();
    let y = tape.lora_linear(&tape.param(&xp), &base, Some(&tape.param(&bp)), Some(&ad), SEED).unwrap();
    tape.backward(&tape.sum(&y).unwrap()).unwrap();
    assert!(w.grad().is_none(), "the frozen base has no gradient buffer");
    for p in [&xp, &bp].into_iter().chain(ad.params()) {
        let g = p.grad().unwrap_or_else(|| panic!("{} got no gradient", p.name()));
        assert_eq!(g.shape(), p.value().shape(), "{}", p.name());
        assert_eq!(g.dtype(), DType::F32, "{}", p.name());
    }

    // Frozen adapter and an input without gradient: nothing to differentiate, so nothing is recorded or saved.
    let frozen = LoraAdapter {
        lora_a: Param::frozen("proj.lora_A.weight", ad.lora_a.value()),
        lora_b: Param::frozen("proj.lora_B.weight", ad.lora_b.value()),
        magnitude: ad.magnitude.as_ref().map(|m| Param::frozen("proj.lora_magnitude_vector", m.value())),
        config: ad.config.clone(),
    };
    let tape = Tape::new();
    let y = tape.lora_linear(&Var::constant(xp.value()), &base, None, Some(&frozen), SEED).unwrap();
    assert!(!y.requires_grad());
    assert_eq!(tape.saved_bytes().peak(), 0);
}

/// DoRA over an NF4 base whose rows are whole blocks takes g = m/n through the dequantization (each block's absmax
/// times its row's g) instead of scaling the output: its value and every gradient equal the same op over the
/// dequantized weight held dense (where g scales W by a pass), within f32 rounding, and with a magnitude far from the
/// weight norm, so that g matters.
#[test]
fn dora_folds_g_into_whole_block_nf4_rows() {
    let mut rng = Rng::new(17);
    let (out_f, in_f, r, tokens) = (12, 128, 4, 9);
    let q = Nf4Weight::quantize(&randn(&[out_f, in_f], 0.05, DType::F32, &mut rng), 64, true).unwrap();
    let (nf4, dense) = (BaseWeight::Nf4(q.clone()), BaseWeight::Dense(q.dequantize(DType::F32).unwrap()));
    let cfg = config(r, 8.0, false, true, 0.0);
    let a = randn(&[r, in_f], 0.1, DType::F32, &mut rng);
    let b = randn(&[out_f, r], 0.1, DType::F32, &mut rng);
    let m = Tensor::from_vec((0..out_f).map(|i| 0.2 + 0.3 * i as f32).collect::<Vec<f32>>(), &[out_f]).unwrap();
    let x = randn(&[tokens, in_f], 1.0, DType::F32, &mut rng);
    let dy = randn(&[tokens, out_f], 1.0, DType::F32, &mut rng);
    let run = |base: &BaseWeight| {
        let ad = adapter_from(&cfg, a.clone(), b.clone(), Some(m.clone()));
        let xp = Param::trainable("x", x.clone());
        let tape = Tape::new();
        let y = tape.lora_linear(&tape.param(&xp), base, None, Some(&ad), SEED).unwrap();
        tape.backward(&tape.sum(&tape.mul(&y, &Var::constant(dy.clone())).unwrap()).unwrap()).unwrap();
        let magnitude = ad.magnitude.as_ref().unwrap().grad().unwrap();
        [y.value().clone(), xp.grad().unwrap(), ad.lora_a.grad().unwrap(), ad.lora_b.grad().unwrap(), magnitude]
    };
    let (folded, scaled) = (run(&nf4), run(&dense));
    for (what, (got, want)) in ["y", "dx", "dA", "dB", "dm"].iter().zip(folded.iter().zip(&scaled)) {
        let want = f64s(want);
        let tol = Tolerance { abs: 1e-5 * want.iter().fold(1.0f64, |m, v| m.max(v.abs())), rel: 1e-5 };
        assert_close(&format!("nf4 fold vs dense: {what}"), &f64s(got), &want, tol);
    }
}

/// Bytes the op keeps for backward with a frozen NF4 base [out, in] = [256, 512] and 4 tokens: the activations,
/// and the adapter (the base is shared, scales included), never a tensor of out×in elements (the dequantized weight alone is 512 KiB).
#[test]
fn nf4_base_saves_nothing_of_weight_size() {
    let mut rng = Rng::new(7);
    let (tokens, out_f, in_f, r) = (4, 256, 512, 8);
    let w = randn(&[out_f, in_f], 0.02, DType::BF16, &mut rng);
    for double_quant in [false, true] {
        let q = Nf4Weight::quantize(&w, 64, double_quant).unwrap();
        let base = BaseWeight::Nf4(q);
        for dora in [false, true] {
            let ad = LoraAdapter::new("proj", &base, &config(r, 16.0, false, dora, 0.1), &mut rng).unwrap();
            let xp = Param::trainable("x", randn(&[tokens, in_f], 1.0, DType::F32, &mut rng));
            let tape = Tape::new();
            let y = tape.lora_linear(&tape.param(&xp), &base, None, Some(&ad), SEED).unwrap();
            let saved = tape.saved_bytes().current();
            // x, x·Aᵀ, A, B (+ DoRA: g, n, h) in f32; the NF4 base is shared with its owner.
            let mut expect = 4 * (tokens * in_f + tokens * r + r * in_f + out_f * r);
            if dora {
                expect += 4 * (2 * out_f + tokens * out_f);
            }
            assert_eq!(saved, expect, "dora {dora}, double quant {double_quant}");
            assert!(saved < out_f * in_f, "saved {saved} bytes: less than one byte per base weight");
            tape.backward(&tape.sum(&y).unwrap()).unwrap();
            assert_eq!(tape.saved_bytes().current(), 0);
        }
    }
}

/// A random adapter (B ≠ 0, m ≠ ‖W‖) over base [out, in] in f32.
fn trained_adapter(base: &BaseWeight, cfg: &LoraConfig, rng: &mut Rng) -> LoraAdapter {
    let ad = LoraAdapter::new("proj", base, cfg, rng).unwrap();
    let [out_f, _] = base.shape();
    ad.lora_b.set_value(randn(&[out_f, cfg.r], 0.05, DType::F32, rng));
    if let Some(m) = &ad.magnitude {
        let scaled: Vec<f32> =
            m.value().to_vec::<f32>().iter().map(|v| v * (0.7 + 0.6 * rng.uniform() as f32)).collect();
        m.set_value(Tensor::from_vec(scaled, &[out_f]).unwrap());
    }
    ad
}

#[test]
fn merged_weight_reproduces_the_adapter_forward() {
    let mut rng = Rng::new(8);
    let (out_f, in_f) = (33, 70);
    let w = randn(&[out_f, in_f], 0.1, DType::BF16, &mut rng);
    let x = Var::constant(randn(&[2, 5, in_f], 1.0, DType::F32, &mut rng));
    let bias = Var::constant(randn(&[out_f], 1.0, DType::F32, &mut rng));
    let nf4 = BaseWeight::Nf4(Nf4Weight::quantize(&w, 64, true).unwrap());
    for base in [BaseWeight::Dense(w.clone()), nf4] {
        for (rs, dora) in [(false, false), (true, false), (false, true), (true, true)] {
            let ad = trained_adapter(&base, &config(8, 16.0, rs, dora, 0.0), &mut rng);
            let tape = Tape::new();
            let y = tape.lora_linear(&x, &base, Some(&bias), Some(&ad), SEED).unwrap();
            let merged = merged_weight(&base, &ad, DType::F32).unwrap();
            let y_merged = tape.linear(&x, &Var::constant(merged.clone()), Some(&bias)).unwrap();
            let what = format!("rslora {rs}, dora {dora}");
            assert_close(&what, &f64s(y_merged.value()), &f64s(y.value()), Tolerance::F32);
            let bf16 = merged_weight(&base, &ad, DType::BF16).unwrap();
            assert_eq!(bf16.dtype(), DType::BF16);
            assert_eq!(bf16.to_vec::<f32>(), merged.to_dtype(DType::BF16).to_vec::<f32>(), "{what}: rounded once");

            let n = ad.weight_norm(&base).unwrap();
            let back = unmerged_weight(&merged, &ad, Some(&n)).unwrap();
            let w0 = f64s(&base.materialize(DType::F32).unwrap());
            assert_close(&format!("{what}: unmerge"), &f64s(&back), &w0, Tolerance { abs: 1e-6, rel: 1e-5 });
            if dora {
                let e = unmerged_weight(&merged, &ad, None).unwrap_err().to_string();
                assert!(e.contains("proj.lora_magnitude_vector") && e.contains("weight norm"), "{e}");
            }
        }
    }
}

#[test]
fn delta_weight_is_scaled_b_times_a() {
    let mut rng = Rng::new(9);
    let base = BaseWeight::Dense(randn(&[6, 9], 0.3, DType::F32, &mut rng));
    let ad = trained_adapter(&base, &config(2, 3.0, true, false, 0.0), &mut rng);
    let (a, b, s) = (f64s(&ad.lora_a.value()), f64s(&ad.lora_b.value()), 3.0 / 2f64.sqrt());
    let mut expect = vec![0.0; 6 * 9];
    for j in 0..6 {
        for k in 0..9 {
            expect[j * 9 + k] = s * (0..2).map(|q| b[j * 2 + q] * a[q * 9 + k]).sum::<f64>();
        }
    }
    let got = ad.delta_weight(&base).unwrap();
    assert_eq!(got.shape(), &[6, 9]);
    assert_close("s·B·A", &f64s(&got), &expect, Tolerance::F32);
}

#[test]
fn checkpoint_recompute_gives_bit_identical_gradients() {
    let mut rng = Rng::new(10);
    let base = BaseWeight::Nf4(Nf4Weight::quantize(&randn(&[16, 64], 0.1, DType::F32, &mut rng), 64, true).unwrap());
    for dora in [false, true] {
        let ad = trained_adapter(&base, &config(4, 8.0, false, dora, 0.25), &mut rng);
        let bias = Param::trainable("bias", randn(&[16], 1.0, DType::F32, &mut rng));
        let x0 = randn(&[6, 64], 1.0, DType::F32, &mut rng);
        let g = Var::constant(randn(&[6, 16], 1.0, DType::F32, &mut rng));
        let params: Vec<Param> = ad.params().into_iter().cloned().chain([bias.clone()]).collect();
        let mut runs = Vec::new();
        // Plain, checkpointed, and checkpointed with the recompute recording the op for its gradients alone.
        for (checkpointed, unread) in [(false, false), (true, false), (true, true)] {
            params.iter().for_each(Param::zero_grad);
            let xp = Param::trainable("x", x0.clone());
            let tape = Tape::new();
            let x = tape.param(&xp);
            let unread_runs = std::rc::Rc::new(std::cell::Cell::new(0));
            let y = if checkpointed {
                let (base, ad, bias, runs) = (base.clone(), ad.clone(), bias.clone(), unread_runs.clone());
                let outs = tape
                    .checkpoint(&[&x], move |t, v| {
                        let bias = Some(t.param(&bias));
                        let y = if unread && t.recomputing() {
                            runs.set(runs.get() + 1);
                            let p = LoraProjection {
                                base: &base,
                                bias: bias.as_ref(),
                                adapter: Some(&ad),
                                dropout_seed: SEED,
                            };
                            let y = t.lora_linear_unread(&v[0], p)?;
                            assert_eq!(y.value().to_vec::<f32>().iter().any(|&e| e != 0.0), dora, "zeros for LoRA");
                            y
                        } else {
                            t.lora_linear(&v[0], &base, bias.as_ref(), Some(&ad), SEED)?
                        };
                        Ok(vec![y])
                    })
                    .unwrap();
                outs.into_iter().next().unwrap()
            } else {
                tape.lora_linear(&x, &base, Some(&tape.param(&bias)), Some(&ad), SEED).unwrap()
            };
            tape.backward(&tape.sum(&tape.mul(&y, &g).unwrap()).unwrap()).unwrap();
            assert_eq!(unread_runs.get(), usize::from(unread), "the recompute (only) records it unread");
            let grads: Vec<Vec<f32>> =
                [&xp].into_iter().chain(&params).map(|p| p.grad().unwrap().to_vec::<f32>()).collect();
            runs.push((y.value().to_vec::<f32>(), grads));
        }
        for run in &runs[1..] {
            assert_eq!(runs[0].0, run.0, "dora {dora}: same output");
            assert_eq!(runs[0].1, run.1, "dora {dora}: bit-identical gradients (x, A, B, m, bias)");
        }
    }
}

#[test]
fn dropout_mask_comes_from_the_seed() {
    let mut rng = Rng::new(11);
    let base = BaseWeight::Dense(randn(&[8, 32], 0.2, DType::F32, &mut rng));
    let ad = trained_adapter(&base, &config(4, 8.0, false, false, 0.5), &mut rng);
    let x = Var::constant(randn(&[10, 32], 1.0, DType::F32, &mut rng));
    let tape = Tape::new();
    let run = |seed| tape.lora_linear(&x, &base, None, Some(&ad), seed).unwrap().value().to_vec::<f32>();
    assert_eq!(run(1), run(1), "same seed, same mask");
    assert_ne!(run(1), run(2), "another seed, another mask");
    // Eval mode: the same parameters without dropout give the dropout-free output, whatever the seed.
    let eval = ad.without_dropout();
    assert!(eval.lora_a.value().shares_storage(&ad.lora_a.value()), "parameters are shared, not copied");
    let no_dropout = trained_adapter(&base, &config(4, 8.0, false, false, 0.0), &mut rng);
    no_dropout.lora_a.set_value(ad.lora_a.value());
    no_dropout.lora_b.set_value(ad.lora_b.value());
    let y_eval = tape.lora_linear(&x, &base, None, Some(&eval), 1).unwrap();
    let y_ref = tape.lora_linear(&x, &base, None, Some(&no_dropout), 2).unwrap();
    assert_eq!(y_eval.value().to_vec::<f32>(), y_ref.value().to_vec::<f32>());
    assert_ne!(y_eval.value().to_vec::<f32>(), run(1));
    // About half the elements dropped (the reference's mask, as the op must draw it).
    let kept = mask(320, 0.5, 1).iter().filter(|&&k| k > 0.0).count();
    assert!((130..=190).contains(&kept), "kept {kept} of 320");
}

#[test]
fn adapter_set_switches_tasks_over_one_base() {
    let mut rng = Rng::new(12);
    let base = BaseWeight::Nf4(Nf4Weight::quantize(&randn(&[10, 64], 0.1, DType::F32, &mut rng), 64, true).unwrap());
    let x = Var::constant(randn(&[3, 64], 1.0, DType::F32, &mut rng));
    let sql = trained_adapter(&base, &config(4, 8.0, false, false, 0.0), &mut rng);
    let chat = trained_adapter(&base, &config(8, 16.0, false, true, 0.0), &mut rng);
    let mut set = AdapterSet::new();
    assert!(set.insert("sql", sql.clone()).is_none());
    assert!(set.insert("chat", chat.clone()).is_none());
    let tape = Tape::new();
    let out = |set: &AdapterSet| set.linear(&tape, &x, &base, None, SEED).unwrap().value().to_vec::<f32>();
    let direct =
        |ad: Option<&LoraAdapter>| tape.lora_linear(&x, &base, None, ad, SEED).unwrap().value().to_vec::<f32>();
    assert_eq!(set.active_name(), None);
    assert_eq!(out(&set), direct(None), "no active adapter: the plain base");
    set.set_active(Some("sql")).unwrap();
    assert_eq!(out(&set), direct(Some(&sql)));
    set.set_active(Some("chat")).unwrap();
    assert_eq!(set.active_name(), Some("chat"));
    assert_eq!(out(&set), direct(Some(&chat)));
    assert_ne!(direct(Some(&sql)), direct(Some(&chat)));
    let e = set.set_active(Some("summarize")).unwrap_err().to_string();
    assert!(e.contains("summarize") && e.contains("chat") && e.contains("sql"), "{e}");
    assert_eq!(set.active_name(), Some("chat"), "a failed switch keeps the active adapter");

    // Training the active adapter leaves the other untouched.
    let y = set.linear(&tape, &x, &base, None, SEED).unwrap();
    tape.backward(&tape.sum(&y).unwrap()).unwrap();
    assert!(chat.params().iter().all(|p| p.grad().is_some()));
    assert!(sql.params().iter().all(|p| p.grad().is_none()));

    assert!(set.get("sql").is_some());
    assert!(set.remove("chat").is_some());
    assert_eq!(set.active_name(), None, "removing the active adapter falls back to the base");
    assert_eq!(out(&set), direct(None));
}

#[test]
fn shape_errors_name_the_tensor() {
    let mut rng = Rng::new(13);
    let base = BaseWeight::Dense(randn(&[6, 10], 0.1, DType::F32, &mut rng));
    let ad = LoraAdapter::new("layers.3.mlp.up_proj", &base, &config(4, 8.0, false, true, 0.0), &mut rng).unwrap();
    let tape = Tape::new();
    let x = Var::constant(randn(&[2, 10], 1.0, DType::F32, &mut rng));
    let err = |r: qlora_runtime::Result<Var>| r.unwrap_err().to_string();

    let bad_a = LoraAdapter {
        lora_a: Param::trainable("layers.3.mlp.up_proj.lora_A.weight", Tensor::zeros(&[4, 9], DType::F32)),
        ..ad.clone()
    };
    let e = err(tape.lora_linear(&x, &base, None, Some(&bad_a), SEED));
    assert!(e.contains("layers.3.mlp.up_proj.lora_A.weight") && e.contains("[4, 9]"), "{e}");
    let no_m = LoraAdapter { magnitude: None, ..ad.clone() };
    let e = err(tape.lora_linear(&x, &base, None, Some(&no_m), SEED));
    assert!(e.contains("lora_magnitude_vector"), "{e}");
    let e = err(tape.lora_linear(&Var::constant(Tensor::zeros(&[2, 9], DType::F32)), &base, None, Some(&ad), SEED));
    assert!(e.contains("[2, 9]"), "{e}");
    let e = err(tape.lora_linear(&x, &base, Some(&Var::constant(Tensor::zeros(&[5], DType::F32))), None, SEED));
    assert!(e.contains("bias"), "{e}");
    let other_base = BaseWeight::Dense(Tensor::zeros(&[7, 10], DType::F32));
    let e = ad.delta_weight(&other_base).unwrap_err().to_string();
    assert!(e.contains("lora_B.weight"), "{e}");
    assert!(merged_weight(&other_base, &ad, DType::BF16).is_err());
}

// ---- parity with peft ----

const SCRIPT: &str = "scripts/reference/peft_fixtures.py";

/// Case names, f32 values and metadata of the peft fixture; panics (never skips) when the file is missing.
struct Fixture {
    tensors: HashMap<String, (Vec<usize>, DType, Vec<f32>)>,
    meta: HashMap<String, String>,
}

impl Fixture {
    fn load() -> Self {
        let path = std::env::var_os("QLORA_PEFT_FIXTURE").map(PathBuf::from).unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("autograd/ sits in the workspace root")
                .join("tests/fixtures/peft/peft_lora.safetensors")
        });
        let bytes = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "cannot read the peft fixture {} ({e}).\n\
                 Generate it with PyTorch and peft (CPU is enough), from the repository root:\n    \
                 python3 {SCRIPT} --out tests/fixtures/peft\n\
                 (or set QLORA_PEFT_FIXTURE to the path of an existing peft_lora.safetensors)",
                path.display()
            )
        });
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: not valid safetensors: {e:?}", path.display()));
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).expect("fixture header");
        let meta = header.metadata().clone().unwrap_or_default();
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let (dtype, values): (DType, Vec<f32>) = match view.dtype() {
                safetensors::Dtype::F32 => (
                    DType::F32,
                    view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                ),
                // bf16 is the top half of an f32.
                safetensors::Dtype::BF16 => (
                    DType::BF16,
                    view.data()
                        .chunks_exact(2)
                        .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
                        .collect(),
                ),
                other => panic!("fixture tensor {name}: unexpected dtype {other:?} (regenerate it with {SCRIPT})"),
            };
            tensors.insert(name, (view.shape().to_vec(), dtype, values));
        }
        Fixture { tensors, meta }
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor in its stored dtype (bf16 values are exact in f32, so the round trip is lossless).
    fn tensor(&self, name: &str) -> Tensor {
        let (shape, dtype, values) =
            self.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks {name} (regenerate it with {SCRIPT})"));
        Tensor::from_slice(values, shape).unwrap().to_dtype(*dtype)
    }

    fn meta(&self, key: &str) -> &str {
        self.meta.get(key).unwrap_or_else(|| panic!("fixture metadata lacks {key} (regenerate it with {SCRIPT})"))
    }

    fn cases(&self) -> Vec<String> {
        let mut cases: Vec<String> =
            self.meta("cases").split(',').map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect();
        cases.sort();
        cases
    }
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// f32: different summation orders (1e-5 relative, 1e-6 of the tensor's scale absolute). bf16: peft rounds the base
/// output and the result to bf16, so within a few bf16 roundings (2⁻⁸ ≈ 0.4% each) of the tensor's scale.
fn tolerance(dtype: &str, reference: &[f64]) -> Tolerance {
    let scale = max_abs(reference).max(1.0);
    match dtype {
        "float32" => Tolerance { abs: 1e-6 * scale, rel: 1e-5 },
        "bfloat16" => Tolerance { abs: 1e-2 * scale, rel: 1e-2 },
        other => panic!("fixture case dtype {other} is not float32 or bfloat16"),
    }
}

#[test]
fn matches_peft_forward_backward_and_merge() {
    let fx = Fixture::load();
    let cases = fx.cases();
    assert!(cases.len() >= 6, "expected at least 6 cases, got {cases:?}");
    for case in &cases {
        let key = |k: &str| format!("{case}.{k}");
        let dtype = fx.meta(&key("dtype")).to_owned();
        let cfg = LoraConfig {
            r: fx.meta(&key("r")).parse().unwrap(),
            alpha: fx.meta(&key("lora_alpha")).parse().unwrap(),
            use_rslora: fx.meta(&key("use_rslora")) == "true",
            use_dora: fx.meta(&key("use_dora")) == "true",
            dropout: 0.0,
            init: LoraInit::Default,
        };
        let peft_scaling: f64 = fx.meta(&key("scaling")).parse().unwrap();
        assert!((cfg.scaling() - peft_scaling).abs() <= 1e-15 * peft_scaling.abs(), "{case}: scaling");

        let w = fx.tensor(&key("weight"));
        let base = BaseWeight::Dense(w.clone());
        let module = fx.meta(&key("module"));
        let ad = LoraAdapter {
            lora_a: Param::trainable(format!("{module}.lora_A.weight"), fx.tensor(&key("lora_A"))),
            lora_b: Param::trainable(format!("{module}.lora_B.weight"), fx.tensor(&key("lora_B"))),
            magnitude: cfg.use_dora.then(|| {
                Param::trainable(format!("{module}.lora_magnitude_vector"), fx.tensor(&key("lora_magnitude_vector")))
            }),
            config: cfg.clone(),
        };
        // Our parameter names are peft's state-dict keys (as get_peft_model_state_dict writes them).
        let peft_keys: Vec<&str> = fx.meta(&key("peft_keys")).split(',').collect();
        for p in ad.params() {
            assert!(peft_keys.contains(&p.name()), "{case}: {} not among peft's keys {peft_keys:?}", p.name());
        }
        assert_eq!(peft_keys.len(), ad.params().len(), "{case}: peft saves {peft_keys:?}");

        let xp = Param::trainable("x", fx.tensor(&key("x")));
        let bp = Param::trainable("bias", fx.tensor(&key("bias")));
        let tape = Tape::new();
        let y = tape.lora_linear(&tape.param(&xp), &base, Some(&tape.param(&bp)), Some(&ad), SEED).unwrap();
        let g = fx.tensor(&key("grad_output"));
        tape.backward(&tape.sum(&tape.mul(&y, &Var::constant(g)).unwrap()).unwrap()).unwrap();

        let compare = |what: &str, got: &Tensor| {
            let expect = f64s(&fx.tensor(&key(what)));
            assert_eq!(got.elem_count(), expect.len(), "{case}.{what}: size");
            assert_close(&format!("{case}.{what}"), &f64s(got), &expect, tolerance(&dtype, &expect));
        };
        compare("y", y.value());
        compare("grad_x", &xp.grad().unwrap());
        compare("grad_bias", &bp.grad().unwrap());
        compare("grad_lora_A", &ad.lora_a.grad().unwrap());
        compare("grad_lora_B", &ad.lora_b.grad().unwrap());
        compare("delta_weight", &ad.delta_weight(&base).unwrap());
        compare("merged_weight", &merged_weight(&base, &ad, w.dtype()).unwrap());
        let n = ad.weight_norm(&base).unwrap();
        if let Some(m) = &ad.magnitude {
            compare("grad_lora_magnitude_vector", &m.grad().unwrap());
            compare("weight_norm", &n);
        } else {
            assert!(!fx.has(&key("grad_lora_magnitude_vector")), "{case}: peft trained a magnitude for plain LoRA");
        }
        // peft's unmerge of its own merged weight, with its cached norm; ours from the same inputs.
        let peft_merged = fx.tensor(&key("merged_weight"));
        let peft_n = cfg.use_dora.then(|| fx.tensor(&key("weight_norm")));
        compare("unmerged_weight", &unmerged_weight(&peft_merged, &ad, peft_n.as_ref()).unwrap());
    }
}
