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
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qlora-cli"));
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
    let out =
        run(tmp.path(), &[("HF_HUB_CACHE", &hub)], &[&args[..], &["--device", "cpu", "--max-seq-len", "64"]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = std::fs::read_to_string(tmp.path().join("out/adapter_config.json")).unwrap();
    // peft's AutoPeftModel loads the base by this name: the Hub id, not the machine's cache path.
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["base_model_name_or_path"], "test-org/tiny");
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
    let err = error_line(&run(
        tmp.path(),
        &offline,
        &["eval", "--model", "test-org/tiny", "--revision", "v9", "--data", "x"],
    ));
    assert!(err.contains("revision v9") && err.contains("refs/v9"), "{err}");
    let err = error_line(&run(tmp.path(), &offline, &["inspect", "test-org/tiny", "--revision", "../../etc"]));
    assert!(err.contains("--revision \"../../etc\" is not a branch, tag or commit name"), "{err}");
    // Online, but the Hub cannot be reached: port 9 (discard) on the loopback is closed.
    let closed = [("HF_HUB_CACHE", hub.as_path()), ("HF_ENDPOINT", Path::new("http://127.0.0.1:9"))];
    let err = error_line(&run(tmp.path(), &closed, &["inspect", "test-org/absent"]));
    assert!(err.contains("downloading it failed") && err.contains(&looked.display().to_string()), "{err}");
}

/// A stand-in for the Hub's HTTP API on a loopback port, serving the Llama fixture as `test-org/tiny` at commit
/// MAIN the way hf-hub reads it (the revision API's file list; `resolve` answering ranges with the etag, commit
/// and size headers), and `test-org/gated` only to the bearer token "secret". Serves until the test ends.
fn serve_fake_hub() -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut stream = stream;
                // One request after another on a kept-alive connection.
                loop {
                    let mut head = Vec::new();
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                        head.push(std::mem::take(&mut line));
                    }
                    let Some(path) = head.first().and_then(|l| l.split(' ').nth(1)).map(str::to_string) else {
                        return;
                    };
                    let header = |name: &str| {
                        head.iter().find_map(|h| {
                            let (k, v) = h.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                    };
                    let (status, headers, body) = fake_hub_answer(&path, header("range"), header("authorization"));
                    let mut reply = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
                    headers.iter().for_each(|h| reply.push_str(&format!("{h}\r\n")));
                    reply.push_str("\r\n");
                    if stream.write_all(reply.as_bytes()).and_then(|()| stream.write_all(&body)).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn fake_hub_answer(path: &str, range: Option<String>, auth: Option<String>) -> (String, Vec<String>, Vec<u8>) {
    let files: Vec<String> = std::fs::read_dir(fixture("llama"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    if path.contains("test-org/gated") && auth.as_deref() != Some("Bearer secret") {
        return ("401 Unauthorized".into(), vec![], b"{\"error\":\"gated\"}".to_vec());
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        assert!(rest.ends_with("/revision/main"), "{path}");
        let siblings: Vec<_> = files.iter().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({"sha": MAIN, "siblings": siblings}).to_string();
        return ("200 OK".into(), vec!["Content-Type: application/json".into()], body.into_bytes());
    }
    let file = path.rsplit('/').next().unwrap();
    let bytes = std::fs::read(fixture("llama").join(file)).unwrap();
    let start: usize =
        range.as_deref().and_then(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse().ok()).unwrap_or(0);
    let end = if range.as_deref().is_some_and(|r| r.ends_with("-0")) { 0 } else { bytes.len() - 1 };
    let headers = vec![
        format!("ETag: \"blob-{file}\""),
        format!("X-Repo-Commit: {MAIN}"),
        format!("Content-Range: bytes {start}-{end}/{}", bytes.len()),
    ];
    ("206 Partial Content".into(), headers, bytes[start..=end].to_vec())
}

#[test]
fn a_missing_model_is_downloaded_into_the_cache_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = tmp.path().join("hub");
    let endpoint = serve_fake_hub();
    let env = [("HF_HUB_CACHE", hub.as_path()), ("HF_ENDPOINT", Path::new(&endpoint))];
    assert!(architecture(&run(tmp.path(), &env, &["inspect", "test-org/tiny"])).contains("Llama"));
    // huggingface_hub's layout: refs/main → the commit; snapshot files link to blobs named by etag.
    let repo = hub.join("models--test-org--tiny");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap(), MAIN);
    let config = repo.join("snapshots").join(MAIN).join("config.json");
    assert!(std::fs::symlink_metadata(&config).unwrap().file_type().is_symlink());
    assert_eq!(std::fs::read(&config).unwrap(), std::fs::read(fixture("llama/config.json")).unwrap());
    assert!(repo.join("blobs/blob-model.safetensors").is_file());
    // Only the weights Checkpoint::open reads: not the fixture's other safetensors file.
    assert!(!repo.join("snapshots").join(MAIN).join("reference.safetensors").exists());
    // A download cut short (a weight file missing) is completed.
    std::fs::remove_file(repo.join("snapshots").join(MAIN).join("model.safetensors")).unwrap();
    assert!(architecture(&run(tmp.path(), &env, &["inspect", "test-org/tiny"])).contains("Llama"));
    // Now cached: found offline.
    let offline = [("HF_HUB_CACHE", hub.as_path()), ("HF_HUB_OFFLINE", Path::new("1"))];
    assert!(architecture(&run(tmp.path(), &offline, &["inspect", "test-org/tiny"])).contains("Llama"));

    // A gated model: refused without HF_TOKEN, with a line saying so; downloaded with it.
    let err = error_line(&run(tmp.path(), &env, &["inspect", "test-org/gated"]));
    assert!(err.contains("401") && err.contains("needs HF_TOKEN"), "{err}");
    let token = [env[0], env[1], ("HF_TOKEN", Path::new("secret"))];
    assert!(architecture(&run(tmp.path(), &token, &["inspect", "test-org/gated"])).contains("Llama"));
}
