//! `qlora-rt`: the command-line tool. Every failure is one line on stderr and a non-zero exit status.

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
}

#[derive(Subcommand)]
enum Command {
    /// Train a two-layer toy decoder from scratch on CPU and print its falling loss (a smoke test of the
    /// whole stack: every op forward and backward, checkpointing, AdamW).
    Toy(toy::ToyArgs),
}

fn main() -> ExitCode {
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
    let cli = match Cli::try_parse() {
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
    let result = match cli.command {
        Command::Toy(args) => toy::run(&args),
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
