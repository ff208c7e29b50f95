//! `qlora-rt generate` and `eval` with several adapters over one base, on the tiny Llama fixture (vocabulary of 101
//! tokens, ChatML template): a two-adapter `--prompts` run gives each prompt the completion a run with that adapter
//! alone gives, `eval` reports each adapter as it would alone, and bad prompt files end in one error naming the line.

mod common;

use common::{one_line_error, qlora_rt};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/llama");

fn fixture_adapter() -> PathBuf {
    Path::new(MODEL).join("adapter")
}

/// The fixture adapter with lora_alpha ×(−4): the same modules, a different effect.
fn second_adapter(dir: &Path) -> PathBuf {
    let out = dir.join("second");
    std::fs::create_dir(&out).unwrap();
    let src = fixture_adapter();
    std::fs::copy(src.join("adapter_model.safetensors"), out.join("adapter_model.safetensors")).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap()).unwrap();
    config["lora_alpha"] = (-32).into();
    std::fs::write(out.join("adapter_config.json"), config.to_string()).unwrap();
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `generate` alone with `flags` (greedy, 8 new tokens): the streamed completion, without the final newline.
fn alone(flags: &[&str]) -> String {
    let mut args = vec!["generate", "--model", MODEL, "--max-new-tokens", "8"];
    args.extend(flags);
    ok(qlora_rt(&args)).strip_suffix('\n').expect("a final newline").to_string()
}

fn prompts_run(file: &Path, flags: &[&str]) -> Vec<Value> {
    let mut args = vec!["generate", "--model", MODEL, "--max-new-tokens", "8", "--prompts", s(file)];
    args.extend(flags);
    ok(qlora_rt(&args)).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write(dir: &Path, lines: &[Value]) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let text: Vec<String> = lines.iter().map(Value::to_string).collect();
    std::fs::write(&path, text.join("\n") + "\n").unwrap();
    path
}

#[test]
fn two_adapters_in_one_run_equal_each_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fixture_adapter(), second_adapter(dir.path()));
    let chat = |user: &str| serde_json::json!([{"role": "user", "content": user}]);
    let file = write(
        dir.path(),
        &[
            serde_json::json!({"messages": chat("what is the answer?"), "adapter": "b"}),
            serde_json::json!({"prompt": "the answer", "adapter": "a"}),
            serde_json::json!({"prompt": "the answer", "adapter": "b"}),
            serde_json::json!({"messages": chat("what is the answer?"), "adapter": "a"}),
            serde_json::json!({"prompt": "the answer"}),
        ],
    );
    let (a_arg, b_arg) = (format!("a={}", s(&a)), format!("b={}", s(&b)));
    let got = prompts_run(&file, &["--adapter", &a_arg, "--adapter", &b_arg]);
    let chat_alone = |adapter: &Path| alone(&["--adapter", s(adapter), "--chat", "what is the answer?"]);
    let raw_alone = |adapter: &Path| alone(&["--adapter", s(adapter), "--prompt", "the answer"]);
    let want = [
        ("b", chat_alone(&b)),
        ("a", raw_alone(&a)),
        ("b", raw_alone(&b)),
        ("a", chat_alone(&a)),
        // Several adapters and none named: the base, NF4 as the adapters' base is.
        ("", alone(&["--quantize", "nf4", "--prompt", "the answer"])),
    ];
    assert_eq!(got.len(), want.len());
    for (i, (line, (name, completion))) in got.iter().zip(&want).enumerate() {
        assert_eq!(line["completion"].as_str(), Some(completion.as_str()), "line {}: {line}", i + 1);
        let adapter = line["adapter"].as_str().unwrap_or_default();
        assert_eq!(adapter, *name, "line {}", i + 1);
        assert!(line["tokens"].as_u64().is_some() && line["stop"].is_string(), "{line}");
    }
    // The adapters differ, so the check above could tell them apart.
    assert_ne!(want[1].1, want[2].1, "the two adapters continue the prompt alike");

    // One bare adapter serves lines that name none; "adapter": null is the base; --out writes the file.
    let file = write(
        dir.path(),
        &[serde_json::json!({"prompt": "the answer"}), serde_json::json!({"prompt": "the answer", "adapter": null})],
    );
    let out = dir.path().join("out.jsonl");
    let run = qlora_rt(&[
        "generate",
        "--model",
        MODEL,
        "--max-new-tokens",
        "8",
        "--prompts",
        s(&file),
        "--adapter",
        s(&a),
        "--out",
        s(&out),
    ]);
    assert!(ok(run).is_empty(), "JSON lines go to --out only");
    let lines: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["completion"].as_str(), Some(want[1].1.as_str()));
    assert_eq!(lines[0]["adapter"].as_str(), Some(s(&a)));
    assert_eq!(lines[1]["completion"].as_str(), Some(want[4].1.as_str()));
    assert!(lines[1]["adapter"].is_null());
}

#[test]
fn eval_reports_each_adapter_as_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fixture_adapter(), second_adapter(dir.path()));
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, "{\"text\": \"what is the answer? the answer is here.\"}\n").unwrap();
    let eval = |flags: &[&str]| -> Vec<Value> {
        let mut args = vec!["eval", "--model", MODEL, "--data", s(&data), "--json", "--device", "cpu"];
        args.extend(flags);
        ok(qlora_rt(&args)).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (a_arg, b_arg) = (format!("a={}", s(&a)), format!("b={}", s(&b)));
    let both = eval(&["--adapter", &a_arg, "--adapter", &b_arg]);
    let (alone_a, alone_b) = (eval(&["--adapter", s(&a)]), eval(&["--adapter", s(&b)]));
    assert_eq!(both.len(), 2);
    assert_eq!(both[0]["adapter_name"], "a");
    assert_eq!(both[1]["adapter_name"], "b");
    assert_eq!(both[0]["loss"], alone_a[0]["loss"]);
    assert_eq!(both[1]["loss"], alone_b[0]["loss"]);
    assert_ne!(both[0]["loss"], both[1]["loss"]);
    let text = ok(qlora_rt(&["eval", "--model", MODEL, "--data", s(&data), "--adapter", &a_arg, "--adapter", &b_arg]));
    assert!(text.contains("adapter a (14 modules): loss") && text.contains("adapter b (14 modules): loss"), "{text}");
}

#[test]
fn bad_prompts_and_adapters_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let a = format!("a={}", s(&fixture_adapter()));
    let file = dir.path().join("p.jsonl");
    let run = |lines: &str, flags: &[&str]| -> String {
        std::fs::write(&file, lines).unwrap();
        let mut args = vec!["generate", "--model", MODEL, "--prompts", s(&file)];
        args.extend(flags);
        one_line_error(&args)
    };
    // (lines, flags, the line named, what the message says)
    let cases: [(&str, &[&str], usize, &[&str]); 8] = [
        ("{\"prompt\": \"the\"}\n{\"prompt\": \"the\"\n", &[], 2, &["invalid JSON"]),
        ("\n{\"prompt\": \"the\", \"adapter\": \"nope\"}\n", &["--adapter", &a], 2, &["\"nope\"", "--adapter gives a"]),
        ("{\"prompt\": \"the\", \"adapter\": \"a\"}\n", &[], 1, &["no --adapter"]),
        ("{\"prompt\": \"the\", \"messages\": []}\n", &[], 1, &["not both"]),
        ("{\"text\": \"the\"}\n", &[], 1, &["\"prompt\""]),
        ("[1]\n", &[], 1, &["JSON object"]),
        ("{\"messages\": [{\"role\": \"user\"}]}\n", &[], 1, &["messages[0]"]),
        ("{\"prompt\": 3}\n", &[], 1, &["string"]),
    ];
    for (lines, flags, line, says) in cases {
        let e = run(lines, flags);
        let at = format!("p.jsonl: line {line}");
        assert!(e.contains(&at) && says.iter().all(|w| e.contains(w)), "{lines:?}: {e}");
    }
    let e = run("\n\n", &[]);
    assert!(e.contains("no prompt"), "{e}");

    let adapter = s(&fixture_adapter()).to_string();
    let e = one_line_error(&["generate", "--model", MODEL, "--adapter", &a, "--adapter", &a, "--prompt", "the"]);
    assert!(e.contains("needs --prompts"), "{e}");
    std::fs::write(&file, "{\"prompt\": \"the\"}\n").unwrap();
    let e = one_line_error(&["generate", "--model", MODEL, "--prompts", s(&file), "--adapter", &a, "--adapter", &a]);
    assert!(e.contains("given twice"), "{e}");
    let e =
        one_line_error(&["generate", "--model", MODEL, "--prompts", s(&file), "--adapter", &a, "--adapter", &adapter]);
    assert!(e.contains("NAME=DIR"), "{e}");
    let e = one_line_error(&["generate", "--model", MODEL, "--prompts", s(&file), "--adapter", "x=/no/such/dir"]);
    assert!(e.contains("/no/such/dir"), "{e}");
}
