//! Tape semantics: frozen weights, no_grad, gradient accumulation, checkpointing.

use qlora_autograd::{AttentionParams, Glu, Param, SeqLens, Tape, Var};
use qlora_runtime::Rng;
use qlora_runtime::{DType, Device, Result, Tensor};

fn randn(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, 0.5, DType::F64, rng)
}

#[test]
fn frozen_params_get_no_gradient_buffer_and_no_saved_input() {
    let mut r = Rng::new(1);
    let w = Param::frozen("base", randn(&[4, 3], &mut r));
    let a = Param::trainable("adapter", randn(&[4, 3], &mut r));
    let tape = Tape::new();
    let x = Var::constant(randn(&[2, 3], &mut r));
    let frozen_out = tape.linear(&x, &tape.param(&w), None).unwrap();
    assert!(!frozen_out.requires_grad());
    assert_eq!(tape.saved_bytes().current(), 0, "an op with only constant inputs saves nothing");
    let y = tape.add(&frozen_out, &tape.linear(&x, &tape.param(&a), None).unwrap()).unwrap();
    tape.backward(&tape.sum(&y).unwrap()).unwrap();
    assert!(w.grad().is_none());
    assert!(a.grad().is_some());
}

#[test]
fn no_grad_records_nothing() {
    let mut r = Rng::new(2);
    let a = Param::trainable("a", randn(&[3], &mut r));
    let tape = Tape::new();
    let y = tape.no_grad(|| tape.scale(&tape.param(&a), 2.0).unwrap());
    assert!(!y.requires_grad());
    assert!(tape.is_recording(), "no_grad restores recording");
    assert_eq!(tape.saved_bytes().peak(), 0);
}

#[test]
fn gradients_accumulate_across_backward_passes_until_zeroed() {
    let a = Param::trainable("a", Tensor::from_vec(vec![1.0f32, 2.0], &[2]).unwrap());
    for _ in 0..2 {
        let tape = Tape::new();
        let y = tape.scale(&tape.param(&a), 3.0).unwrap();
        tape.backward(&tape.sum(&y).unwrap()).unwrap();
    }
    assert_eq!(a.grad().unwrap().to_vec::<f32>(), vec![6.0, 6.0]);
    assert_eq!(a.grad().unwrap().dtype(), DType::F32);
    a.zero_grad();
    assert!(a.grad().is_none());
}

#[test]
fn backward_rejects_non_scalar_loss() {
    let tape = Tape::new();
    let a = Param::trainable("a", Tensor::ones(&[2], DType::F32));
    let v = tape.param(&a);
    assert!(tape.backward(&v).is_err());
}

/// A small decoder-like block: norm → q/k/v → attention → o → residual → norm → SwiGLU MLP → residual.
struct Block {
    norm1: Param,
    norm2: Param,
    wq: Param,
    wk: Param,
    wv: Param,
    wo: Param,
    gate: Param,
    up: Param,
    down: Param,
}

const HID: usize = 8;
const HEADS: usize = 2;
const KV: usize = 1;
const HD: usize = 4;
const FF: usize = 12;

impl Block {
    fn new(rng: &mut Rng, i: usize) -> Self {
        let p = |n: &str, s: &[usize], rng: &mut Rng| Param::trainable(format!("{i}.{n}"), randn(s, rng));
        Block {
            norm1: Param::trainable(format!("{i}.norm1"), Tensor::ones(&[HID], DType::F64)),
            norm2: Param::frozen(format!("{i}.norm2"), Tensor::ones(&[HID], DType::F64)),
            wq: p("wq", &[HEADS * HD, HID], rng),
            wk: p("wk", &[KV * HD, HID], rng),
            wv: p("wv", &[KV * HD, HID], rng),
            wo: p("wo", &[HID, HEADS * HD], rng),
            gate: p("gate", &[FF, HID], rng),
            up: p("up", &[FF, HID], rng),
            down: p("down", &[HID, FF], rng),
        }
    }

    fn params(&self) -> Vec<&Param> {
        vec![&self.norm1, &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down]
    }

    fn forward(&self, t: &Tape, x: &Var, cu: &SeqLens) -> Result<Var> {
        let tokens = x.shape()[0];
        let p = AttentionParams {
            n_heads: HEADS,
            n_kv_heads: KV,
            head_dim: HD,
            scale: 0.5,
            causal: true,
            sliding_window: None,
            softcap: None,
        };
        let h = t.rms_norm(x, &t.param(&self.norm1), 1e-6, 0.0)?;
        let q = t.reshape(&t.linear(&h, &t.param(&self.wq), None)?, &[tokens, HEADS, HD])?;
        let k = t.reshape(&t.linear(&h, &t.param(&self.wk), None)?, &[tokens, KV, HD])?;
        let v = t.reshape(&t.linear(&h, &t.param(&self.wv), None)?, &[tokens, KV, HD])?;
        let a = t.reshape(&t.attention(&p, &q, &k, &v, cu, cu)?, &[tokens, HEADS * HD])?;
        let x = t.add(x, &t.linear(&a, &t.param(&self.wo), None)?)?;
        let h = t.rms_norm(&x, &t.param(&self.norm2), 1e-6, 0.0)?;
        let m =
            t.glu(Glu::SwiGlu, &t.linear(&h, &t.param(&self.gate), None)?, &t.linear(&h, &t.param(&self.up), None)?)?;
        t.add(&x, &t.linear(&m, &t.param(&self.down), None)?)
    }
}

fn run(
    blocks: &std::rc::Rc<Vec<Block>>,
    x0: &Tensor,
    cu: &SeqLens,
    targets: &Tensor,
    head: &Param,
    ckpt: bool,
) -> (f64, usize) {
    let tape = Tape::new();
    let mut x = Var::constant(x0.clone());
    for i in 0..blocks.len() {
        x = if ckpt {
            let (bs, cu) = (blocks.clone(), cu.clone());
            tape.checkpoint(&[&x], move |t, ins| Ok(vec![bs[i].forward(t, &ins[0], &cu)?])).unwrap().remove(0)
        } else {
            blocks[i].forward(&tape, &x, cu).unwrap()
        };
    }
    let logits = tape.linear(&x, &tape.param(head), None).unwrap();
    let loss = tape.cross_entropy(&logits, targets, 5.0).unwrap();
    tape.backward(&loss).unwrap();
    assert_eq!(tape.saved_bytes().current(), 0);
    (loss.value().to_scalar::<f64>().unwrap(), tape.saved_bytes().peak())
}

#[test]
fn checkpointing_gives_identical_gradients_with_lower_peak_saved_bytes() {
    let mut rng = Rng::new(11);
    let blocks = std::rc::Rc::new((0..3).map(|i| Block::new(&mut rng, i)).collect::<Vec<_>>());
    let head = Param::trainable("head", randn(&[11, HID], &mut rng));
    let x0 = randn(&[7, HID], &mut rng);
    let cu = SeqLens::new(&[0, 3, 7], Device::Cpu).unwrap();
    let targets = Tensor::from_vec(vec![1i32, 4, -100, 10, 0, 2, 7], &[7]).unwrap();

    let all: Vec<&Param> = blocks.iter().flat_map(Block::params).chain([&head]).collect();
    let (loss_plain, peak_plain) = run(&blocks, &x0, &cu, &targets, &head, false);
    let plain: Vec<Vec<f64>> = all.iter().map(|p| p.grad().expect("grad").to_vec::<f64>()).collect();
    all.iter().for_each(|p| p.zero_grad());
    let (loss_ckpt, peak_ckpt) = run(&blocks, &x0, &cu, &targets, &head, true);
    let ckpt: Vec<Vec<f64>> = all.iter().map(|p| p.grad().expect("grad").to_vec::<f64>()).collect();

    assert_eq!(loss_plain.to_bits(), loss_ckpt.to_bits());
    for ((p, a), b) in all.iter().zip(&plain).zip(&ckpt) {
        assert_eq!(a, b, "{}: checkpointed gradient differs", p.name());
    }
    assert!(blocks.iter().all(|b| b.norm2.grad().is_none()), "frozen norm got a gradient");
    assert!(
        peak_ckpt * 2 < peak_plain,
        "checkpointing should at least halve peak saved bytes for 3 blocks: {peak_ckpt} vs {peak_plain}"
    );
}

#[test]
fn checkpoint_reaches_params_even_when_inputs_are_constant() {
    let w = Param::trainable("w", Tensor::ones(&[2, 2], DType::F64));
    let tape = Tape::new();
    let x = Var::constant(Tensor::ones(&[1, 2], DType::F64));
    let wc = w.clone();
    let y = tape.checkpoint(&[&x], move |t, ins| Ok(vec![t.linear(&ins[0], &t.param(&wc), None)?])).unwrap();
    assert!(y[0].requires_grad());
    tape.backward(&tape.sum(&y[0]).unwrap()).unwrap();
    assert_eq!(w.grad().unwrap().to_vec::<f64>(), vec![1.0; 4]);
}

/// A scope recorded unread inside a recompute runs once (in its own backward), not in the recompute too, and gives the
/// gradients an ordinary nested scope gives; outside a recompute it is an error.
#[test]
fn an_unread_scope_in_a_recompute_runs_once_with_the_same_gradients() {
    let w = Param::trainable("w", Tensor::from_vec(vec![0.5f64, -1.0, 2.0, 0.25], &[2, 2]).unwrap());
    let x0 = Tensor::from_vec(vec![1.0f64, 2.0, -3.0, 0.5], &[2, 2]).unwrap();
    let xp = Param::trainable("x", x0);
    let mut results = Vec::new();
    for unread in [false, true] {
        w.zero_grad();
        xp.zero_grad();
        let runs = std::rc::Rc::new(std::cell::Cell::new(0));
        let (wc, counted) = (w.clone(), runs.clone());
        let tape = Tape::new();
        let x = tape.param(&xp);
        let outer = move |t: &Tape, ins: &[Var]| {
            let (wi, c) = (wc.clone(), counted.clone());
            let inner = move |t: &Tape, v: &[Var]| {
                c.set(c.get() + 1);
                Ok(vec![t.mul(&t.linear(&v[0], &t.param(&wi), None)?, &v[0])?])
            };
            let h = t.mul(&ins[0], &ins[0])?;
            let y = if unread && t.recomputing() {
                t.checkpoint_unread(&[&h], &[(h.shape(), DType::F64)], inner)?
            } else {
                t.checkpoint(&[&h], inner)?
            };
            Ok(vec![t.add(&h, &y[0])?])
        };
        let y = tape.checkpoint(&[&x], outer).unwrap();
        tape.backward(&tape.sum(&y[0]).unwrap()).unwrap();
        // Forward, the outer recompute and the inner one's backward; unread, the outer recompute skips it.
        assert_eq!(runs.get(), if unread { 2 } else { 3 }, "unread {unread}");
        results.push((w.grad().unwrap().to_vec::<f64>(), xp.grad().unwrap().to_vec::<f64>()));
    }
    assert_eq!(results[0], results[1]);
    let tape = Tape::new();
    let x = tape.param(&xp);
    let err = tape.checkpoint_unread(&[&x], &[(&[2, 2], DType::F64)], |_, v| Ok(v.to_vec())).unwrap_err();
    assert!(err.to_string().contains("outside a recording recompute"), "{err}");
}
