//! `qlora-rt bench`: how fast training runs here. Two measurements:
//!
//! - whole training steps ([`step`]): a named architecture with random NF4 weights, or a model folder, trained on
//!   random tokens by the very step `finetune` runs; median step time, tokens/s, peak device memory, the time of
//!   each phase and, with `--profile`, the regions that took it.
//! - `bench kernels` ([`kernels`]): every hot CUDA kernel on training shapes, next to the copy bandwidth and GEMM
//!   rate measured in the same run.
//! - `bench decode` ([`decode`]): generation, a prefill then decode steps as `generate` runs them, with the bytes of
//!   weights each step reads as a fraction of the copy bandwidth measured in the same run.
//!
//! Owns the flags and the reports; device time comes from `qlora_runtime::timing`, the step from
//! `finetune::step`, the models from `qlora_models::synthetic` ([`subject`] builds them for both benchmarks).

mod decode;
mod kernels;
pub(crate) mod memory;
mod stats;
mod step;
mod subject;

use anyhow::Result;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    step: step::StepArgs,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// Time every hot CUDA kernel through its launcher on Llama-3.2-1B, Llama-3-8B and Gemma-2-2B training shapes
    /// (4 × 2048 tokens), each against the device-copy bandwidth and the cuBLASLt bf16 GEMM rate measured in the same
    /// run. Without a usable GPU it says so in one line and exits 0.
    Kernels(kernels::KernelArgs),
    /// Time generation as `generate` runs it: a prefill of random prompt ids, then greedy decode steps (median and
    /// p90 per step, tokens/s), with the weight bytes each step reads as GB/s and as a fraction of the device-copy
    /// bandwidth measured in the same run. Runs on the CPU too.
    Decode(decode::DecodeArgs),
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.command {
        Some(BenchCommand::Kernels(k)) => kernels::run(k),
        Some(BenchCommand::Decode(d)) => decode::run(d),
        None => step::run(&args.step),
    }
}
