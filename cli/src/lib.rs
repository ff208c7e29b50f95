//! `qlora-rt`: the command-line tool, as a library so that two packages can ship it as a binary: [`main`] runs it.
//! The root package's `qlora-rt` binary (what `cargo install qlora-rt` installs) and this package's `qlora-cli`
//! binary (what `cargo run -p qlora-cli` runs) are both one call to it. Every failure is one line on stderr and a
//! non-zero exit status.

mod adapter_args;
mod bench;
mod device;
mod eval;
mod export_gguf;
mod finetune;
mod generate;
mod hub;
mod import;
mod inspect;
mod merge;
mod model_path;
mod named_adapters;
mod quantize;
mod toy;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "qlora-rt",
    version,
    about = "QLoRA fine-tuning runtime: NF4 base weights, trainable low-rank adapters."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// For a --model given as a Hugging Face Hub id (ORG/NAME): the branch, tag or commit hash to use.
    #[arg(long, global = true, value_name = "REV")]
    revision: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Train a two-layer toy decoder from scratch on CPU and print its falling loss (a smoke test of the
    /// whole stack: every op forward and backward, checkpointing, AdamW).
    Toy(toy::ToyArgs),
    /// Write a Hugging Face model folder as a 4-bit NF4 checkpoint, byte for byte as transformers + bitsandbytes
    /// save one (loadable by both).
    Quantize(quantize::QuantizeArgs),
    /// Loss and perplexity of a model, with a PEFT adapter or not, over a JSONL file of token or text rows.
    Eval(eval::EvalArgs),
    /// Describe a model folder or a PEFT adapter folder: shapes, parameter counts, dtypes, quantization,
    /// memory needed.
    Inspect(inspect::InspectArgs),
    /// Fine-tune a model with QLoRA (or LoRA) on a JSONL file and write a PEFT adapter, with checkpoints,
    /// resumption, evaluation, metrics and a loss plot.
    Finetune(Box<finetune::FinetuneArgs>),
    /// Generate text from a model (with an adapter or not), streamed as it is produced.
    Generate(generate::GenerateArgs),
    /// Convert a llama.cpp GGUF model (Llama, Gemma 1/2/3; F32/F16/BF16, Q4_0..Q8_0 and K-quants) to a
    /// Hugging Face model folder: config.json, model.safetensors, tokenizer and generation files.
    Import(import::ImportArgs),
    /// Fold a PEFT adapter into its base model (into the NF4 weights QLoRA trained against, by default) and
    /// write a plain Hugging Face checkpoint: bf16, f16 or f32, no quantization_config, tokenizer files copied.
    Merge(merge::MergeArgs),
    /// Write a model (with a PEFT adapter merged in, or not) as one GGUF file for llama.cpp: llama, gemma,
    /// gemma2 or gemma3 architecture, matrices as f16, q8_0, q4_0 or q4_1, tokenizer and chat template included.
    ExportGguf(export_gguf::ExportGgufArgs),
    /// Time whole QLoRA training steps of a built-in architecture with random NF4 weights (--shape) or of a model
    /// folder (--model): median step time, tokens/s, peak device memory, time per phase; `bench kernels` times
    /// every hot CUDA kernel against the copy and GEMM ceilings.
    Bench(Box<bench::BenchArgs>),
}

/// Runs the command line in `std::env::args`, returning the process's exit status.
pub fn main() -> ExitCode {
    // NVLink multicast stays off in NCCL groups (forbidden on the GPU machines this runs on; data parallelism's
    // buffers gain nothing from it) unless the caller says otherwise. Set first, while this process has one thread:
    // set later, among threads, it would race their reads of the environment. `--gpus N`'s ranks inherit it.
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    // A bug must still end in one line, not a backtrace; the message says where to report it.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        eprintln!("qlora-rt: internal error{at}: {msg} (this is a bug; please report it)");
    }));
    // `finetune --config FILE` becomes the file's flags followed by the command line's, which win.
    let argv = match finetune::expand_config(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("qlora-rt: error: {}", chain.join(": "));
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::try_parse_from(argv) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: clap's own output on stdout.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("qlora-rt: error: no command given (see --help)");
            return ExitCode::from(2);
        }
        Err(e) => {
            // Clap's usage block is several lines; keep its first line, which names the bad argument.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            eprintln!("qlora-rt: {first} (see --help)");
            return ExitCode::from(2);
        }
    };
    hub::set_revision(cli.revision);
    let result = match cli.command {
        Command::Toy(args) => toy::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Quantize(args) => quantize::run(&args),
        Command::Finetune(args) => finetune::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Import(args) => import::run(&args),
        Command::Merge(args) => merge::run(&args),
        Command::ExportGguf(args) => export_gguf::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes joined, outermost first.
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("qlora-rt: error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}
