//! The binary's contract: --help and --version work; a failing command exits non-zero with one line on stderr.

mod common;

use common::qlora_rt;

#[test]
fn help_and_version() {
    let help = qlora_rt(&["--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("toy"), "help lists the subcommands: {text}");
    let version = qlora_rt(&["--version"]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn failures_are_one_line_and_non_zero() {
    for args in [&["toy", "--steps", "0"][..], &["toy", "--lr=-1"][..], &["toy", "--lr", "NaN"][..]] {
        let out = qlora_rt(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line on stderr, got: {err}");
        assert!(err.starts_with("qlora-rt: error: "), "{err}");
        assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
    }
    for args in [&["toy", "--steps", "many"][..], &["no-such-command"][..], &[][..]] {
        let out = qlora_rt(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: usage errors exit 2");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line on stderr, got: {err}");
        assert!(err.starts_with("qlora-rt: error: "), "{err}");
    }
}

#[test]
fn toy_runs_and_reports_falling_loss() {
    let out = qlora_rt(&["toy", "--steps", "60", "--log-every", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    assert!(last.starts_with("loss ") && last.contains("lower"), "{text}");
}
