//! The root package ships the `qlora-rt` binary (`cargo install qlora-rt`), the very command line of `qlora-cli`.

use std::process::Command;

#[test]
fn the_installed_binary_is_the_command_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_qlora-rt")).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("qlora-rt {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(env!("CARGO_BIN_EXE_qlora-rt")).arg("no-such-command").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error, as qlora-cli reports it");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("qlora-rt: "));
}
