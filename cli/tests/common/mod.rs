//! Running the built binary, for every CLI test file.

// Each test file compiles its own copy of this module and calls only what it needs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary the GPU tests run: QLORA_RT_BIN when they run on another machine (the built-in path is this one's),
/// else the one cargo built.
pub fn gpu_test_bin() -> PathBuf {
    std::env::var_os("QLORA_RT_BIN").map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qlora-cli")), PathBuf::from)
}

/// Runs [`gpu_test_bin`] with `args`, failing the test with both streams unless it succeeds.
pub fn gpu_run_ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    let out = Command::new(gpu_test_bin()).args(args).output().expect("run qlora-rt");
    let shown: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    assert!(
        out.status.success(),
        "qlora-rt {}:\n{}\n{}",
        shown.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// torchrun's environment for a group of one rank on GPU 0 (the whole multi-GPU path on one GPU), with a port
/// nobody listens on now for its rendezvous: call it once per run.
pub fn torchrun_group_of_one() -> Vec<(&'static str, String)> {
    let socket = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a free port");
    let port = socket.local_addr().expect("a bound port").port();
    let vars = [("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")];
    let mut env: Vec<(&str, String)> = vars.map(|(k, v)| (k, v.to_string())).to_vec();
    env.push(("MASTER_PORT", port.to_string()));
    env
}

/// Runs the built `qlora-rt` with `args`.
pub fn qlora_rt(args: &[&str]) -> Output {
    qlora_rt_cached(args, None)
}

/// Runs the built `qlora-rt` with `args`, with `$QLORA_RT_CACHE` (where `.gguf` models are imported) at `cache`.
pub fn qlora_rt_cached(args: &[&str], cache: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora-cli"));
    if let Some(cache) = cache {
        cmd.env("QLORA_RT_CACHE", cache);
    }
    cmd.args(args).output().expect("run qlora-rt")
}

/// Runs `qlora-rt` with `args`, which must fail with status 1 and one `qlora-rt: error:` line on stderr; that line.
pub fn one_line_error(args: &[&str]) -> String {
    let out = qlora_rt(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should fail with status 1");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: one line on stderr, got: {err}");
    assert!(err.starts_with("qlora-rt: error: ") && !err.contains("panicked"), "{err}");
    err
}

/// The error line of a failed run: the last line on stderr (notes such as the CPU notice may precede it), with
/// no panic anywhere.
pub fn last_error_line(out: &Output) -> String {
    assert!(!out.status.success(), "the run should have failed");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = err.trim_end().lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("qlora-rt: error: "), "{err}");
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{err}");
    last
}

/// `qlora-rt merge --model MODEL --adapter ADAPTER --out OUT FLAGS…`.
pub fn merge(model: &Path, adapter: &Path, out: &Path, flags: &[&str]) -> Output {
    let mut args = vec![
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(flags);
    qlora_rt(&args)
}

/// Runs `qlora-rt args` (a finetune writing to `out`) until metrics.jsonl holds three steps, then sends it SIGINT
/// (Ctrl-C); its output once it has stopped (stderr captured).
pub fn interrupt_after_three_steps(args: &[&str], out: &Path) -> Output {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let child = Command::new(env!("CARGO_BIN_EXE_qlora-cli"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qlora-rt");
    let start = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(60), "no progress after a minute");
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("run kill");
    assert!(sent.success());
    child.wait_with_output().expect("wait for qlora-rt")
}

/// Twelve chat rows (data.jsonl in `dir`) in words the fixture tokenizer knows, varied so that packing and evaluation see different rows.
pub fn chat_data(dir: &Path) -> PathBuf {
    let rows: Vec<String> = (0..12)
        .map(|i| {
            let user = format!("what is {i} and {}?", i + 1);
            let assistant = format!("the answer is {}, i think.", 2 * i + 1);
            serde_json::json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
                .to_string()
        })
        .collect();
    let path = dir.join("data.jsonl");
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}
