//! The `qlora-rt` command line, installed by `cargo install qlora-rt`; the commands live in the `qlora-cli` crate.

fn main() -> std::process::ExitCode {
    qlora_cli::main()
}
