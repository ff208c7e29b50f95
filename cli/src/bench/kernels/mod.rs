//! `qlora-rt bench kernels`: every hot CUDA kernel through its public launcher, on the training shapes of
//! Llama-3.2-1B, Llama-3-8B and Gemma-2-2B at 4 × 2048 tokens, next to two ceilings measured first in the same run:
//! a device-to-device copy of 1 GiB (bytes read + written) for the memory-bound kernels and a cuBLASLt bf16 GEMM
//! 8192 × 8192 × 8192 (through our own `matmul` launcher) for the compute-bound ones.
//!
//! Each row is the median of `--reps` timed repetitions (CUDA events around each) after `--warmup` untimed ones.
//! Inputs are random, never zeros; when one repetition's buffers would sit in L2 they are rotated through copies
//! that together exceed it, so a row measures DRAM, not cache. GB/s counts the bytes a kernel must read and write
//! at the least; TFLOP/s the useful FLOPs (attention: causal forward 2·b·h·t²·d, backward 2.5× that).
//!
//! One module per kernel family; [`Bench`] holds what they share: the device, random inputs, timing and printing.

mod adamw;
mod attention;
mod cast;
pub(super) mod ceilings;
mod embedding;
mod gemm;
mod glu;
mod loss;
mod nf4;
mod norm;
mod rope;

use super::stats::summarize;
use anyhow::Result;
use half::bf16;
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer, DeviceCopy};
use qlora_kernels::Rng;
use qlora_models::synthetic::shape_config;
use qlora_models::ModelConfig;
use qlora_runtime::timing::Mark;
use qlora_runtime::Device;
use serde_json::json;

#[derive(clap::Args)]
pub struct KernelArgs {
    /// Timed repetitions per row (the median is reported).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(20..))]
    reps: u32,
    /// Untimed repetitions before them.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Only the rows whose name contains this (the ceilings are always measured).
    #[arg(long, value_name = "TEXT")]
    filter: Option<String>,
    /// Print one JSON object per row (JSON lines) instead of the table.
    #[arg(long)]
    json: bool,
}

/// Tokens of a training micro-batch: the peer benchmarks' 4 × 2048.
pub const TOKENS: usize = 4 * 2048;

/// A buffer set whose one repetition reads and writes less than this is rotated through copies that add up to it:
/// several times the 50 MiB L2 of an H100/H200.
const ROTATE_BYTES: usize = 256 << 20;
/// Random values drawn per buffer at most, repeated beyond (a 4 GiB logits buffer needs no more entropy).
const DISTINCT_VALUES: usize = 1 << 22;

/// What a repetition does, for its rate.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// Bytes read plus bytes written (compared with the copy ceiling).
    Bytes(f64),
    /// Floating-point operations (compared with the GEMM ceiling).
    Flops(f64),
}

/// The rates the rows are compared with.
#[derive(Clone, Copy, Debug)]
pub struct Ceilings {
    pub copy_gbps: f64,
    pub gemm_tflops: f64,
}

/// What the families share.
pub struct Bench {
    pub dev: CudaDevice,
    ordinal: usize,
    reps: u32,
    warmup: u32,
    json: bool,
    filter: Option<String>,
    ceilings: Option<Ceilings>,
    rng: Rng,
}

/// The model shapes the rows are measured on.
pub fn models() -> Result<Vec<(&'static str, ModelConfig)>> {
    ["llama-3.2-1b", "llama-3-8b", "gemma-2-2b"].into_iter().map(|name| Ok((name, shape_config(name)?))).collect()
}

type Family = fn(&mut Bench) -> Result<()>;

/// Every family after the ceilings, in the order of a training step.
const FAMILIES: [(&str, Family); 10] = [
    ("embedding", embedding::run),
    ("rms_norm", norm::run),
    ("nf4", nf4::run),
    ("gemm", gemm::run),
    ("rope", rope::run),
    ("attention", attention::run),
    ("glu", glu::run),
    ("cross_entropy", loss::run),
    ("cast", cast::run),
    ("adamw", adamw::run),
];

pub fn run(args: &KernelArgs) -> Result<()> {
    let dev = match qlora_runtime::cuda_device(0) {
        Ok(dev) => dev,
        Err(e) => {
            println!("bench kernels: no usable CUDA GPU ({e}); nothing to measure");
            return Ok(());
        }
    };
    let mut b = Bench {
        ordinal: dev.ordinal(),
        dev,
        reps: args.reps,
        warmup: args.warmup,
        json: args.json,
        filter: args.filter.clone(),
        ceilings: None,
        rng: Rng::new(0x5EED_BE7C),
    };
    if !b.json {
        println!(
            "bench kernels on {}: median of {} reps after {} warm-up; GB/s = bytes read + written",
            b.dev, b.reps, b.warmup
        );
        println!("{:<30} {:<54} {:>9} {:>8} {:>8} {:>9}", "kernel", "shape", "ms", "GB/s", "TFLOP/s", "ceiling");
    }
    b.ceilings = Some(ceilings::run(&mut b)?);
    for (family, run) in FAMILIES {
        // One family's failure (out of memory on a smaller GPU, say) should not hide the others' rows.
        if let Err(e) = run(&mut b) {
            let msg = format!("{e:#}");
            if b.json {
                println!("{}", json!({ "family": family, "error": msg }));
            } else {
                println!("{family}: failed: {msg}");
            }
        }
    }
    Ok(())
}

impl Bench {
    /// Whether the row `name` is wanted (`--filter`); families ask before allocating its inputs.
    pub fn wants(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }

    /// How many copies of a repetition's buffers (`bytes` in all) to rotate through so they leave L2 between uses.
    pub fn copies(&self, bytes: usize) -> usize {
        ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(1, 64)
    }

    /// Times `rep(i)` (i counts every call, warm-up included, so a rotation index is `i % copies`) and prints the row;
    /// returns the median in ms.
    pub fn row(&mut self, name: &str, shape: &str, work: Work, rep: impl FnMut(usize) -> Result<()>) -> Result<f64> {
        let ms = median_ms(Device::Cuda(self.ordinal), self.warmup as usize, self.reps as usize, rep)?;
        self.print(name, shape, work, ms);
        Ok(ms)
    }

    fn print(&self, name: &str, shape: &str, work: Work, ms: f64) {
        let (gbps, tflops) = match work {
            Work::Bytes(b) => (Some(b / ms / 1e6), None),
            Work::Flops(f) => (None, Some(f / ms / 1e9)),
        };
        let fraction = self.ceilings.map(|c| match work {
            Work::Bytes(_) => gbps.unwrap_or(0.0) / c.copy_gbps,
            Work::Flops(_) => tflops.unwrap_or(0.0) / c.gemm_tflops,
        });
        if self.json {
            let round = |x: f64, p: f64| (x * p).round() / p;
            let row = json!({
                "name": name,
                "shape": shape,
                "ms": round(ms, 1e4),
                "gbps": gbps.map(|g| round(g, 10.0)),
                "tflops": tflops.map(|t| round(t, 100.0)),
                "of_ceiling": fraction.map(|f| round(f, 1e3)),
                "reps": self.reps,
            });
            println!("{row}");
        } else {
            let opt = |x: Option<f64>, digits: usize| x.map_or("-".to_string(), |v| format!("{v:.digits$}"));
            let fraction = fraction.map_or("(ceiling)".to_string(), |f| format!("{:.0}%", 100.0 * f));
            println!("{name:<30} {shape:<54} {ms:>9.4} {:>8} {:>8} {fraction:>9}", opt(gbps, 0), opt(tflops, 1));
        }
    }

    /// `n` values from `draw`, at most [`DISTINCT_VALUES`] of them distinct, on the device.
    fn upload_with<T: DeviceCopy>(&mut self, n: usize, mut draw: impl FnMut(&mut Rng) -> T) -> Result<DeviceBuffer<T>> {
        let distinct: Vec<T> = (0..n.min(DISTINCT_VALUES)).map(|_| draw(&mut self.rng)).collect();
        let values: Vec<T> = distinct.iter().copied().cycle().take(n).collect();
        Ok(self.dev.upload(&values)?)
    }

    /// N(0, std²) in bf16.
    pub fn normal_bf16(&mut self, n: usize, std: f64) -> Result<DeviceBuffer<bf16>> {
        self.upload_with(n, |r| bf16::from_f64(std * r.normal()))
    }

    /// N(0, std²) in f32.
    pub fn normal_f32(&mut self, n: usize, std: f64) -> Result<DeviceBuffer<f32>> {
        self.upload_with(n, |r| (std * r.normal()) as f32)
    }

    /// Uniform in [lo, hi) in f32.
    pub fn uniform_f32(&mut self, n: usize, lo: f64, hi: f64) -> Result<DeviceBuffer<f32>> {
        self.upload_with(n, |r| r.uniform_range(lo, hi) as f32)
    }

    /// Uniform random bytes.
    pub fn bytes(&mut self, n: usize) -> Result<DeviceBuffer<u8>> {
        self.upload_with(n, |r| r.next_u64() as u8)
    }

    /// Token ids uniform in 0..below.
    pub fn ids(&mut self, n: usize, below: usize) -> Result<DeviceBuffer<i32>> {
        self.upload_with(n, |r| r.below(below as u64) as i32)
    }
}

/// The median ms of `reps` calls of `rep(i)` on `device`, each between two marks, after `warmup` untimed ones (i counts
/// every call, warm-up included, so a rotation index is `i % copies`).
pub fn median_ms(device: Device, warmup: usize, reps: usize, mut rep: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..warmup {
        rep(i)?;
    }
    let mut marks = Vec::with_capacity(reps);
    for i in 0..reps {
        let start = Mark::now(device)?;
        rep(warmup + i)?;
        marks.push((start, Mark::now(device)?));
    }
    let times = marks.iter().map(|(a, b)| a.elapsed_ms(b)).collect::<qlora_runtime::Result<Vec<f64>>>()?;
    Ok(summarize(&times).median)
}

/// `[a, b, …]` for a shape column.
pub fn dims(d: &[usize]) -> String {
    format!("[{}]", d.iter().map(usize::to_string).collect::<Vec<_>>().join(", "))
}
