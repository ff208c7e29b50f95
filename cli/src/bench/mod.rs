//! `qlora-rt bench`: how fast training runs here. Two measurements:
//!
//! - whole training steps ([`step`]): a named architecture with random NF4 weights, or a model folder, trained on
//!   random tokens by the very step `finetune` runs; median step time, tokens/s, peak device memory, the time of
//!   each phase and, with `--profile`, the regions that took it.
//! - `bench kernels` ([`kernels`]): every hot CUDA kernel on training shapes, next to the copy bandwidth and GEMM
//!   rate measured in the same run.
//!
//! Owns the flags and the reports; device time comes from `qlora_runtime::timing`, the step from
//! `finetune::step`, the models from `qlora_models::synthetic`.

mod kernels;
pub(crate) mod memory;
mod stats;
mod step;

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
}

pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.command {
        Some(BenchCommand::Kernels(k)) => kernels::run(k),
        None => step::run(&args.step),
    }
}
