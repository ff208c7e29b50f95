//! CPU kernel throughput, each beside the ceiling it is measured against in the same run:
//! GEMM in FLOP/s; memory-bound kernels (RMSNorm, NF4 dequantization) in bytes/s next to a plain copy of the
//! same bytes. Run: `cargo bench --bench cpu_kernels`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qlora_rt::kernels::attention::{attention_forward, AttentionParams};
use qlora_rt::kernels::matmul::{matmul, Gemm};
use qlora_rt::kernels::nf4::{dequantize_nf4, nf4_num_blocks, nf4_packed_len, quantize_nf4};
use qlora_rt::kernels::rms_norm::rms_norm_forward;
use qlora_rt::kernels::Rng;
use std::hint::black_box;

fn randn(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

fn gemm(c: &mut Criterion) {
    let mut rng = Rng::new(1);
    let mut g = c.benchmark_group("gemm_f32");
    for &(m, n, k) in &[(512usize, 512usize, 512usize), (2048, 576, 576)] {
        let (a, b) = (randn(m * k, &mut rng), randn(k * n, &mut rng));
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64)); // FLOPs
        g.bench_function(format!("{m}x{n}x{k} (x·wᵀ)"), |bench| {
            let p = Gemm::new(m, n, k).trans_b(true);
            bench.iter(|| matmul(&p, black_box(&a), black_box(&b), &mut out))
        });
    }
    g.finish();
}

fn memory_bound(c: &mut Criterion) {
    let mut rng = Rng::new(2);
    let (rows, dim) = (2048usize, 576usize);
    let x = randn(rows * dim, &mut rng);
    let w = randn(dim, &mut rng);
    let (mut y, mut rstd) = (vec![0f32; rows * dim], vec![0f32; rows]);
    let mut g = c.benchmark_group("memory_bound");
    g.throughput(Throughput::Bytes((2 * rows * dim * 4) as u64)); // read x, write y
    g.bench_function("copy (ceiling)", |b| b.iter(|| y.copy_from_slice(black_box(&x))));
    g.bench_function("rms_norm", |b| b.iter(|| rms_norm_forward(black_box(&x), &w, dim, 1e-6, 0.0, &mut y, &mut rstd)));

    let n = 4096 * 4096;
    let wq = randn(n, &mut rng);
    let (mut packed, mut absmax) = (vec![0u8; nf4_packed_len(n)], vec![0f32; nf4_num_blocks(n, 64)]);
    quantize_nf4(&wq, 64, &mut packed, &mut absmax);
    let mut out = vec![0f32; n];
    g.throughput(Throughput::Bytes((n * 4) as u64)); // f32 written
    g.bench_function("nf4 dequant 4096x4096 → f32", |b| {
        b.iter(|| dequantize_nf4(black_box(&packed), &absmax, 64, &mut out))
    });
    g.bench_function("copy 4096x4096 f32 (ceiling)", |b| b.iter(|| out.copy_from_slice(black_box(&wq))));
    g.finish();
}

fn attention(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    let (t, h, kv, d) = (512usize, 9usize, 3usize, 64usize);
    let (q, k, v) = (randn(t * h * d, &mut rng), randn(t * kv * d, &mut rng), randn(t * kv * d, &mut rng));
    let cu = [0i32, t as i32];
    let p = AttentionParams {
        n_heads: h,
        n_kv_heads: kv,
        head_dim: d,
        scale: 1.0 / (d as f64).sqrt(),
        causal: true,
        sliding_window: None,
        softcap: None,
    };
    let (mut out, mut lse) = (vec![0f32; t * h * d], vec![0f32; t * h]);
    let mut g = c.benchmark_group("attention_f32");
    // Causal: about half of the 4·t²·h·d FLOPs of QKᵀ and PV.
    g.throughput(Throughput::Elements((2 * t * t * h * d) as u64));
    g.bench_function("forward 512 tokens, 9/3 heads, d64", |b| {
        b.iter(|| attention_forward(&p, black_box(&q), &k, &v, [&cu, &cu], &mut out, &mut lse))
    });
    g.finish();
}

criterion_group!(benches, gemm, memory_bound, attention);
criterion_main!(benches);
