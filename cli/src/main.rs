//! `cargo run -p qlora-cli`: the `qlora-rt` command line (see `lib.rs`), built from this package.

fn main() -> std::process::ExitCode {
    qlora_cli::main()
}
