//! Attention forward, and forward + backward, on packed sequences (bf16, GQA): causal 4 × 2048 with 32 heads over 8
//! KV heads at head_dim 64 and 128 and 8 over 4 at 256 (Llama-3.2-1B, Llama-3-8B, Gemma-2-2B), and one sequence of
//! 8192 tokens at head_dim 256, causal and with Gemma 2's sliding window of 4096. The shapes and FLOP counts are
//! `../shared/bench/kernel_anchors.py`'s for PyTorch's SDPA: causal forward 2·b·h·t²·d (a window of w keeps
//! 4·b·h·d·(t·w − w²/2)), backward 2.5× the forward. On Hopper the rows run the wgmma kernels where they serve the
//! head_dim, and the `mma.sync` rows the portable kernels every other GPU runs, for comparison.

use super::{Bench, Work};
use anyhow::Result;
use half::bf16;
use qlora_kernels::attention::AttentionParams;
use qlora_kernels::cuda::attention::{attention_backward_with, attention_forward_with, FlashPath};
use qlora_kernels::cuda::DeviceBuffer;

/// One configuration: `batch` sequences of `seq` tokens.
struct Case {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

const CASES: [Case; 5] = [
    Case { batch: 4, seq: 2048, heads: 32, kv_heads: 8, head_dim: 64, window: None },
    Case { batch: 4, seq: 2048, heads: 32, kv_heads: 8, head_dim: 128, window: None },
    Case { batch: 4, seq: 2048, heads: 8, kv_heads: 4, head_dim: 256, window: None },
    Case { batch: 1, seq: 8192, heads: 8, kv_heads: 4, head_dim: 256, window: None },
    Case { batch: 1, seq: 8192, heads: 8, kv_heads: 4, head_dim: 256, window: Some(4096) },
];

impl Case {
    fn params(&self) -> AttentionParams {
        AttentionParams {
            n_heads: self.heads,
            n_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            scale: (self.head_dim as f64).powf(-0.5),
            causal: true,
            sliding_window: self.window,
            softcap: None,
        }
    }

    /// FLOPs of the forward: two products of 2·d FLOPs per visible (query, key) pair, a causal square counted as
    /// half of t².
    fn forward_flops(&self) -> f64 {
        let t = self.seq as f64;
        let pairs = match self.window {
            Some(w) if (w as f64) < t => t * w as f64 - (w as f64).powi(2) / 2.0,
            _ => t * t / 2.0,
        };
        4.0 * (self.batch * self.heads * self.head_dim) as f64 * pairs
    }

    fn label(&self) -> String {
        let window = self.window.map_or("causal".to_string(), |w| format!("window {w}"));
        format!("{window} b{} t{} h{}/{} d{}", self.batch, self.seq, self.heads, self.kv_heads, self.head_dim)
    }
}

/// Inputs, outputs and gradients of one case.
struct Buffers {
    q: DeviceBuffer<bf16>,
    k: DeviceBuffer<bf16>,
    v: DeviceBuffer<bf16>,
    d_out: DeviceBuffer<bf16>,
    cu_seqlens: DeviceBuffer<i32>,
    max_seqlen: usize,
    out: DeviceBuffer<bf16>,
    lse: DeviceBuffer<f32>,
    dq: DeviceBuffer<bf16>,
    dk: DeviceBuffer<bf16>,
    dv: DeviceBuffer<bf16>,
}

/// The only calls to the attention launchers: their kernels are being replaced, so a change of their signatures is
/// adapted here and nowhere else.
fn attention(path: FlashPath, p: &AttentionParams, a: &mut Buffers, backward: bool) -> Result<()> {
    let (cu, len) = ([&a.cu_seqlens; 2], [a.max_seqlen; 2]);
    attention_forward_with(path, p, &a.q, &a.k, &a.v, cu, len, &mut a.out, &mut a.lse)?;
    if backward {
        let grads = [&mut a.dq, &mut a.dk, &mut a.dv];
        attention_backward_with(path, p, [&a.q, &a.k, &a.v], [&a.out, &a.d_out], &a.lse, cu, len, grads)?;
    }
    Ok(())
}

pub fn run(b: &mut Bench) -> Result<()> {
    let target = b.dev.target();
    let hopper = target.arch == 90 && target.arch_specific;
    let mut rows = vec![("attention fwd", FlashPath::Fastest, false), ("attention fwd+bwd", FlashPath::Fastest, true)];
    if hopper {
        rows.extend([
            ("attention fwd mma.sync", FlashPath::Portable, false),
            ("attention fwd+bwd mma.sync", FlashPath::Portable, true),
        ]);
    }
    rows.retain(|(name, ..)| b.wants(name));
    if rows.is_empty() {
        return Ok(());
    }
    for case in &CASES {
        let t = case.batch * case.seq;
        let (nq, nkv) = (t * case.heads * case.head_dim, t * case.kv_heads * case.head_dim);
        let cu: Vec<i32> = (0..=case.batch).map(|s| (s * case.seq) as i32).collect();
        let mut a = Buffers {
            q: b.normal_bf16(nq, 1.0)?,
            k: b.normal_bf16(nkv, 1.0)?,
            v: b.normal_bf16(nkv, 1.0)?,
            d_out: b.normal_bf16(nq, 1.0)?,
            cu_seqlens: b.dev.upload(&cu)?,
            max_seqlen: case.seq,
            out: b.dev.alloc(nq)?,
            lse: b.dev.alloc(t * case.heads)?,
            dq: b.dev.alloc(nq)?,
            dk: b.dev.alloc(nkv)?,
            dv: b.dev.alloc(nkv)?,
        };
        let p = case.params();
        let flops = case.forward_flops();
        for &(name, path, backward) in &rows {
            let work = Work::Flops(if backward { 3.5 * flops } else { flops });
            b.row(name, &case.label(), work, |_| attention(path, &p, &mut a, backward))?;
        }
    }
    Ok(())
}
