//! Every recorded op's backward, through the tape, against central finite differences in f64.
//! (The kernels have their own checks; these catch wiring: wrong transposes, lost scales, skipped inputs.)

use qlora_autograd::{AttentionParams, Glu, Param, SeqLens, Tape, Var};
use qlora_runtime::ops::rope::rope_tables;
use qlora_runtime::testing::{check_gradient, dot};
use qlora_runtime::Rng;
use qlora_runtime::{DType, Device, Result, Tensor};

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 1.0, DType::F64, rng)
}

/// Checks d/d(input i) of Σ build(inputs) ⊙ g for every input.
fn check(name: &str, inputs: Vec<Tensor>, build: impl Fn(&Tape, &[Var]) -> Result<Var>) {
    let mut rng = Rng::new(0xC0FFEE);
    let params: Vec<Param> =
        inputs.iter().enumerate().map(|(i, t)| Param::trainable(format!("{name}{i}"), t.clone())).collect();
    let tape = Tape::new();
    let vars: Vec<Var> = params.iter().map(|p| tape.param(p)).collect();
    let out = build(&tape, &vars).unwrap();
    let g = randn(out.shape(), &mut rng);
    let loss = tape.sum(&tape.mul(&out, &Var::constant(g.clone())).unwrap()).unwrap();
    tape.backward(&loss).unwrap();
    assert_eq!(tape.saved_bytes().current(), 0, "{name}: backward must release every saved tensor");
    let gv = g.to_vec::<f64>();
    for (i, p) in params.iter().enumerate() {
        let analytic = p.grad().unwrap_or_else(|| panic!("{name}: no gradient reached input {i}")).to_vec::<f64>();
        let x0 = inputs[i].to_vec::<f64>();
        let loss_at = |x: &[f64]| {
            let mut ins: Vec<Var> = inputs.iter().map(|t| Var::constant(t.clone())).collect();
            ins[i] = Var::constant(Tensor::from_slice(x, inputs[i].shape()).unwrap());
            let out = build(&Tape::new(), &ins).unwrap();
            dot(&out.value().to_vec::<f64>(), &gv)
        };
        check_gradient(&format!("{name}: input {i}"), &x0, &analytic, loss_at);
    }
}

#[test]
fn linear_with_and_without_bias() {
    let mut r = Rng::new(1);
    for (rows, inp, out) in [(1, 1, 1), (3, 5, 7), (2, 4, 3)] {
        check(
            "linear",
            vec![randn(&[rows, 2, inp], &mut r), randn(&[out, inp], &mut r), randn(&[out], &mut r)],
            |t, v| t.linear(&v[0], &v[1], Some(&v[2])),
        );
        check("linear no bias", vec![randn(&[rows, inp], &mut r), randn(&[out, inp], &mut r)], |t, v| {
            t.linear(&v[0], &v[1], None)
        });
    }
}

#[test]
fn matmul_batched_broadcast_and_transposed() {
    let mut r = Rng::new(2);
    check("matmul 2d", vec![randn(&[3, 5], &mut r), randn(&[5, 4], &mut r)], |t, v| t.matmul(&v[0], &v[1]));
    check("matmul batched", vec![randn(&[2, 3, 5], &mut r), randn(&[2, 5, 4], &mut r)], |t, v| t.matmul(&v[0], &v[1]));
    check("matmul shared rhs", vec![randn(&[2, 3, 5], &mut r), randn(&[5, 4], &mut r)], |t, v| t.matmul(&v[0], &v[1]));
}

#[test]
fn elementwise_reshape_sum() {
    let mut r = Rng::new(3);
    let (a, b) = (randn(&[3, 4], &mut r), randn(&[3, 4], &mut r));
    check("add", vec![a.clone(), b.clone()], |t, v| t.add(&v[0], &v[1]));
    check("mul", vec![a.clone(), b.clone()], |t, v| t.mul(&v[0], &v[1]));
    check("scale", vec![a.clone()], |t, v| t.scale(&v[0], -0.7));
    check("reshape", vec![a.clone()], |t, v| t.reshape(&v[0], &[2, 6]));
    check("sum", vec![a.clone()], |t, v| t.sum(&v[0]));
    check("add same var twice", vec![a], |t, v| t.add(&v[0], &v[0]));
}

#[test]
fn activations_and_gated_units() {
    let mut r = Rng::new(4);
    let (g, u) = (randn(&[5, 3], &mut r), randn(&[5, 3], &mut r));
    check("silu", vec![g.clone()], |t, v| t.silu(&v[0]));
    check("gelu", vec![g.clone()], |t, v| t.gelu_tanh(&v[0]));
    check("swiglu", vec![g.clone(), u.clone()], |t, v| t.glu(Glu::SwiGlu, &v[0], &v[1]));
    check("geglu", vec![g.clone(), u], |t, v| t.glu(Glu::GeGlu, &v[0], &v[1]));
    check("softcap", vec![g], |t, v| t.softcap(&v[0], 1.5));
}

#[test]
fn embedding_norms_rope() {
    let mut r = Rng::new(5);
    let ids = Tensor::from_vec(vec![3i32, 0, 3, 1], &[2, 2]).unwrap();
    check("embedding", vec![randn(&[5, 3], &mut r)], |t, v| t.embedding(&v[0], &ids));
    for offset in [0.0, 1.0] {
        check("rms_norm", vec![randn(&[3, 7], &mut r), randn(&[7], &mut r)], |t, v| {
            t.rms_norm(&v[0], &v[1], 1e-6, offset)
        });
    }
    for offset in [0.0, 1.0] {
        let ins = vec![randn(&[3, 7], &mut r), randn(&[3, 7], &mut r), randn(&[7], &mut r)];
        // Both outputs read on: the gradient of x and of the residual is h's own plus the norm's.
        check("add_rms_norm", ins.clone(), |t, v| {
            let (h, y) = t.add_rms_norm(&v[0], &v[1], &v[2], 1e-6, offset)?;
            t.add(&y, &t.scale(&h, 0.37)?)
        });
        check("add_rms_norm, y alone", ins.clone(), |t, v| Ok(t.add_rms_norm(&v[0], &v[1], &v[2], 1e-6, offset)?.1));
        let w = Var::constant(ins[2].clone());
        check("add_rms_norm, h alone", ins[..2].to_vec(), |t, v| Ok(t.add_rms_norm(&v[0], &v[1], &w, 1e-6, offset)?.0));
    }
    let pos = Tensor::from_vec(vec![0i32, 1, 2, 0, 5], &[5]).unwrap();
    let inv = Tensor::from_vec(vec![1.0f64, 0.1, 0.01], &[3]).unwrap();
    let (cos, sin) = rope_tables(&pos, &inv).unwrap();
    check("rope", vec![randn(&[5, 2, 6], &mut r)], |t, v| t.rope(&v[0], &cos, &sin));
    // q and k by the same tables (grouped heads): both read on, then each alone (the other's gradient missing).
    let qk = vec![randn(&[5, 4, 6], &mut r), randn(&[5, 2, 6], &mut r)];
    check("rope_qk", qk.clone(), |t, v| {
        let (q, k) = t.rope_qk(&v[0], &v[1], &cos, &sin)?;
        t.cat_rows(&[t.reshape(&q, &[20, 6])?, t.reshape(&k, &[10, 6])?])
    });
    let k = Var::constant(qk[1].clone());
    check("rope_qk, q alone", qk[..1].to_vec(), |t, v| Ok(t.rope_qk(&v[0], &k, &cos, &sin)?.0));
    let q = Var::constant(qk[0].clone());
    check("rope_qk, k alone", qk[1..].to_vec(), |t, v| Ok(t.rope_qk(&q, &v[0], &cos, &sin)?.1));
}

#[test]
fn attention_gqa_packed_sliding_softcap() {
    let mut r = Rng::new(6);
    let cu = SeqLens::new(&[0, 2, 7], Device::Cpu).unwrap();
    for (heads, kv, window, cap) in [(4, 2, None, None), (3, 1, Some(2), Some(5.0)), (2, 2, None, None)] {
        let p = AttentionParams {
            n_heads: heads,
            n_kv_heads: kv,
            head_dim: 4,
            scale: 0.5,
            causal: true,
            sliding_window: window,
            softcap: cap,
        };
        let ins = vec![randn(&[7, heads, 4], &mut r), randn(&[7, kv, 4], &mut r), randn(&[7, kv, 4], &mut r)];
        check("attention", ins, |t, v| t.attention(&p, &v[0], &v[1], &v[2], &cu, &cu));
    }
}

#[test]
fn cross_entropy_with_ignored_rows() {
    let mut r = Rng::new(7);
    let targets = Tensor::from_vec(vec![2i32, -100, 0, 4], &[4]).unwrap();
    check("cross_entropy", vec![randn(&[4, 5], &mut r)], |t, v| t.cross_entropy(&v[0], &targets, 3.0));
    assert!(Tape::new().cross_entropy(&Var::constant(randn(&[4, 5], &mut r)), &targets, 0.0).is_err());
}
