//! Attention cases shared by the CPU kernel's tests and the CUDA parity tests: one flavour of attention over a packed
//! batch, and the CPU twin's forward and backward on it (what every GPU result is compared with).

use crate::attention::{attention_backward, attention_forward, cu_seqlens, AttentionParams};
use crate::cuda::{CudaDevice, DeviceBuffer, DeviceCopy};
use crate::rng::Rng;
use crate::testing::{gpu, randn};
use crate::Float;

/// One attention flavour over a packed batch of (queries, keys) per sequence.
#[derive(Clone, Copy, Debug)]
pub struct AttentionCase {
    /// (query heads, KV heads).
    pub heads: (usize, usize),
    pub head_dim: usize,
    pub causal: bool,
    pub window: Option<usize>,
    pub softcap: Option<f64>,
    /// Per sequence: (queries, keys).
    pub lens: &'static [(usize, usize)],
}

/// An [`AttentionCase`] of `heads` (query heads, KV heads), short enough to list cases in a table.
pub const fn case(
    heads: (usize, usize),
    head_dim: usize,
    causal: bool,
    window: Option<usize>,
    softcap: Option<f64>,
    lens: &'static [(usize, usize)],
) -> AttentionCase {
    AttentionCase { heads, head_dim, causal, window, softcap, lens }
}

impl AttentionCase {
    pub fn params(&self) -> AttentionParams {
        let p = AttentionParams::new(self.heads.0, self.heads.1, self.head_dim);
        AttentionParams { causal: self.causal, sliding_window: self.window, softcap: self.softcap, ..p }
    }

    pub fn cu_seqlens(&self) -> (Vec<i32>, Vec<i32>) {
        cu_seqlens(self.lens)
    }

    /// Query tokens of the batch.
    pub fn tq(&self) -> usize {
        self.lens.iter().map(|l| l.0).sum()
    }

    /// Key tokens of the batch.
    pub fn tk(&self) -> usize {
        self.lens.iter().map(|l| l.1).sum()
    }

    /// The longest sequence's (queries, keys), as the CUDA launchers take them.
    pub fn max_seqlen(&self) -> [usize; 2] {
        let max = |len: fn(&(usize, usize)) -> usize| self.lens.iter().map(len).max().unwrap_or(0);
        [max(|l| l.0), max(|l| l.1)]
    }

    /// Every sequence has the longest query and key lengths (a backward then takes its sequence-major kernel).
    pub fn equal_sequences(&self) -> bool {
        let [q, k] = self.max_seqlen();
        self.lens.iter().all(|&l| l == (q, k))
    }

    /// Elements of q (and out, d_out) and of k (and v).
    pub fn sizes(&self) -> (usize, usize) {
        (self.tq() * self.heads.0 * self.head_dim, self.tk() * self.heads.1 * self.head_dim)
    }

    /// Random q, k, v and upstream gradient.
    pub fn inputs(&self, seed: u64) -> [Vec<f64>; 4] {
        let mut rng = Rng::new(seed);
        let (q_len, kv_len) = self.sizes();
        [randn(&mut rng, q_len), randn(&mut rng, kv_len), randn(&mut rng, kv_len), randn(&mut rng, q_len)]
    }

    /// Random q, k, v and d_out for a GPU test in the I/O type T (`to` and `from` convert from and to f32):
    /// `N(0, 1)` drawn in that order, q and k scaled up where a cap is set (so that it bends the scores).
    pub fn gpu_inputs<T: DeviceCopy>(
        &self,
        dev: &CudaDevice,
        rng: &mut Rng,
        to: impl Fn(f32) -> T,
        from: impl Fn(T) -> f32,
    ) -> GpuInputs<T> {
        let (nq, nk) = self.sizes();
        let qk_scale = if self.softcap.is_some() { 3.0 } else { 1.0 };
        let mut randn = |n: usize, scale: f64| (0..n).map(|_| to((scale * rng.normal()) as f32)).collect::<Vec<T>>();
        let values = [randn(nq, qk_scale), randn(nk, qk_scale), randn(nk, 1.0), randn(nq, 1.0)];
        let (cu_q, cu_k) = self.cu_seqlens();
        GpuInputs {
            host: values.each_ref().map(|v| v.iter().map(|&x| from(x)).collect()),
            device: values.each_ref().map(|v| upload(dev, v)),
            cu_seqlens: [upload(dev, &cu_q), upload(dev, &cu_k)],
        }
    }

    /// (out, lse) of the CPU kernel; NaN-filled outputs catch any element it leaves unwritten.
    pub fn forward<T: Float>(&self, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
        let (cu_q, cu_k) = self.cu_seqlens();
        let (mut out, mut lse) = (vec![T::nan(); q.len()], vec![T::nan(); self.tq() * self.heads.0]);
        attention_forward(&self.params(), q, k, v, [&cu_q, &cu_k], &mut out, &mut lse);
        (out, lse)
    }

    /// [dq, dk, dv] of the CPU kernel from the forward's `out` and `lse` and the upstream gradient `g`.
    pub fn backward<T: Float>(&self, [q, k, v]: [&[T]; 3], out: &[T], lse: &[T], g: &[T]) -> [Vec<T>; 3] {
        let (cu_q, cu_k) = self.cu_seqlens();
        let (mut dq, mut dk, mut dv) = (vec![T::nan(); q.len()], vec![T::nan(); k.len()], vec![T::nan(); v.len()]);
        attention_backward(&self.params(), [q, k, v], [out, g], lse, [&cu_q, &cu_k], [&mut dq, &mut dk, &mut dv]);
        [dq, dk, dv]
    }

    /// [out, lse, dq, dk, dv] for upstream gradient `g`.
    pub fn forward_backward<T: Float>(&self, q: &[T], k: &[T], v: &[T], g: &[T]) -> [Vec<T>; 5] {
        let (out, lse) = self.forward(q, k, v);
        let [dq, dk, dv] = self.backward([q, k, v], &out, &lse, g);
        [out, lse, dq, dk, dv]
    }
}

/// Each of `runs` (one per dtype, say) on each of `cases` in turn, with inputs drawn from one generator seeded
/// `seed`, when there is a GPU (the CUDA attention parity tests' loop).
pub fn on_gpu(test: &str, seed: u64, cases: &[AttentionCase], runs: &[fn(&CudaDevice, &mut Rng, &AttentionCase)]) {
    let Some(dev) = gpu(test) else { return };
    let mut rng = Rng::new(seed);
    for c in cases {
        for run in runs {
            run(&dev, &mut rng, c);
        }
    }
}

/// A case's inputs on the host and the device, from [`AttentionCase::gpu_inputs`].
pub struct GpuInputs<T: DeviceCopy> {
    /// q, k, v and d_out widened to f32, for the CPU twin.
    pub host: [Vec<f32>; 4],
    /// The same in T on the device.
    pub device: [DeviceBuffer<T>; 4],
    /// (queries, keys).
    pub cu_seqlens: [DeviceBuffer<i32>; 2],
}

fn upload<T: DeviceCopy>(dev: &CudaDevice, v: &[T]) -> DeviceBuffer<T> {
    dev.upload(v).expect("upload")
}

/// lse with −∞ (a query that sees no key) mapped to a finite sentinel, so that assert_close can compare it.
pub fn finite_lse(v: impl IntoIterator<Item = f32>) -> Vec<f64> {
    v.into_iter().map(|l| if l == f32::NEG_INFINITY { -1e30 } else { l as f64 }).collect()
}
