//! `--model ORG/NAME` against a fake Hugging Face cache (the layout `huggingface_hub` writes, with the tiny
//! fixtures as snapshots): every way of naming the cache, `--revision` by branch, tag or commit, a local folder
//! of the same name winning, and one clear line when the model is missing offline or cannot be downloaded. No
//! test touches the network: downloads go to a closed local port.

mod common;

use common::last_error_line as error_line;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const MAIN: &str = "1111111111111111111111111111111111111111";
const V1: &str = "2222222222222222222222222222222222222222";

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(family)
}

/// Copies a fixture model's files (not its subfolders) into `dir`.
fn copy_model(family: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(fixture(family)).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A hub cache holding `test-org/tiny`: main → the Llama fixture, tag v1 → the Gemma 3 fixture.
fn fake_hub(hub: &Path) {
    let repo = hub.join("models--test-org--tiny");
    copy_model("llama", &repo.join("snapshots").join(MAIN));
    copy_model("gemma3", &repo.join("snapshots").join(V1));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), MAIN).unwrap();
    std::fs::write(repo.join("refs/v1"), V1).unwrap();
}

/// Runs `qlora-rt` in `cwd` with the Hub variables given and every other one cleared.
fn run(cwd: &Path, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora-rt"));
    for key in ["HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"] {
        cmd.env_remove(key);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v.as_os_str()))).current_dir(cwd);
    cmd.args(args).output().expect("run qlora-rt")
}

fn architecture(out: &Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    report.lines().find(|l| l.starts_with("architecture")).unwrap_or_default().to_string()
}

#[test]
fn ids_resolve_to_the_cached_snapshot_of_the_revision() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    fake_hub(&hub);
    let llama = "architecture LlamaForCausalLM";
    let inspect = |env: &[(&str, &Path)], extra: &[&str]| {
        let mut args = vec!["inspect", "test-org/tiny"];
        args.extend(extra);
        architecture(&run(tmp.path(), env, &args))
    };
    assert!(inspect(&[("HF_HUB_CACHE", &hub)], &[]).starts_with(llama));
    // HF_HOME/hub, then XDG_CACHE_HOME/huggingface/hub, as huggingface_hub looks.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::rename(&hub, home.join("hub")).unwrap();
    assert!(inspect(&[("HF_HOME", &home)], &[]).starts_with(llama));
    let xdg = tmp.path().join("xdg");
    std::fs::create_dir_all(xdg.join("huggingface")).unwrap();
    std::fs::rename(home.join("hub"), xdg.join("huggingface/hub")).unwrap();
    assert!(inspect(&[("XDG_CACHE_HOME", &xdg)], &[]).starts_with(llama));
    // A tag through its ref, a commit directly.
    let env = [("XDG_CACHE_HOME", xdg.as_path())];
    assert!(inspect(&env, &["--revision", "v1"]).contains("Gemma3"), "{}", inspect(&env, &["--revision", "v1"]));
    assert!(inspect(&env, &["--revision", V1]).contains("Gemma3"));
    assert!(inspect(&env, &["--revision", MAIN]).starts_with(llama));
}

#[test]
fn a_local_folder_of_that_name_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    fake_hub(&hub);
    copy_model("gemma3", &tmp.path().join("test-org/tiny"));
    let out = run(tmp.path(), &[("HF_HUB_CACHE", &hub)], &["inspect", "test-org/tiny"]);
    assert!(architecture(&out).contains("Gemma3"));
}

#[test]
fn finetune_and_generate_take_an_id() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    fake_hub(&hub);
    let data = tmp.path().join("data.jsonl");
    std::fs::write(&data, "{\"prompt\":\"what is the answer?\",\"completion\":\" 42.\"}\n".repeat(4)).unwrap();
    let args = ["finetune", "--model", "test-org/tiny", "--data", "data.jsonl", "--out", "out", "--max-steps", "2"];
    let out = run(tmp.path(), &[("HF_HUB_CACHE", &hub)], &[&args[..], &["--device", "cpu", "--max-seq-len", "64"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(tmp.path().join("out/adapter_config.json")).unwrap();
    assert!(config.contains(&format!("models--test-org--tiny/snapshots/{MAIN}")), "{config}");
    let gen = ["generate", "--model", "test-org/tiny", "--adapter", "out", "--prompt", "what", "--max-new-tokens", "2"];
    let out = run(tmp.path(), &[("HF_HUB_CACHE", &hub)], &gen);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_missing_model_is_one_line_naming_where_it_looked() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    fake_hub(&hub);
    let offline = [("HF_HUB_CACHE", hub.as_path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    let err = error_line(&run(tmp.path(), &offline, &["inspect", "test-org/absent"]));
    let looked = hub.join("models--test-org--absent/refs/main");
    assert!(err.contains(&looked.display().to_string()) && err.contains("HF_HUB_OFFLINE"), "{err}");
    let err = error_line(&run(tmp.path(), &offline, &["eval", "--model", "test-org/tiny", "--revision", "v9", "--data", "x"]));
    assert!(err.contains("revision v9") && err.contains("refs/v9"), "{err}");
    // Online, but the Hub cannot be reached: port 9 (discard) on the loopback is closed.
    let closed = [("HF_HUB_CACHE", hub.as_path()), ("HF_ENDPOINT", Path::new("http://127.0.0.1:9"))];
    let err = error_line(&run(tmp.path(), &closed, &["inspect", "test-org/absent"]));
    assert!(err.contains("downloading it failed") && err.contains(&looked.display().to_string()), "{err}");
}
