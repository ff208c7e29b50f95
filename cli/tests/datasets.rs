//! `qlora-rt finetune --data` on dataset files as they come: Alpaca and ShareGPT JSON arrays and Parquet files
//! written by pyarrow train exactly as the same rows in JSONL do (same columns detected, same loss mask, so the
//! same losses bit for bit), and a bad row or an unreadable codec ends in one line naming the file and the row.

mod common;

use common::qlora_rt;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/llama");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/data");

/// Trains 3 steps on `data` into `out`; the (loss, trained_tokens) of each step.
fn train(data: &Path, out: &Path) -> Vec<(f64, u64)> {
    let (data, out_s) = (data.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["finetune", "--model", MODEL, "--data", data, "--out", out_s, "--max-steps", "3"];
    args.extend(["--max-seq-len", "64", "--device", "cpu", "--lr", "1e-2", "--warmup-steps", "0"]);
    let run = qlora_rt(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rows = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap());
    rows.filter_map(|v| Some((v.get("loss")?.as_f64()?, v["trained_tokens"].as_u64()?))).collect()
}

fn write_jsonl(dir: &Path, name: &str, rows: &[Value]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    path
}

/// The rows of tests/fixtures/data/*.parquet (scripts/reference/parquet_fixtures.py), as JSONL would hold them.
fn alpaca_rows() -> Vec<Value> {
    let a = json!({"instruction": "what is the answer?", "input": "", "output": "the answer is 42."});
    let b = json!({"instruction": "add the numbers.", "input": "2 and 2", "output": "it is 4."});
    [a, b].iter().cycle().take(8).cloned().collect()
}

fn sharegpt_rows() -> Vec<Value> {
    vec![
        json!({"system": "be brief.", "conversations": [
            {"from": "human", "value": "what is the answer?"}, {"from": "gpt", "value": "42."}]}),
        json!({"conversations": [{"from": "human", "value": "hi!"}, {"from": "gpt", "value": "hello."}]}),
    ]
}

#[test]
fn json_arrays_and_parquet_train_like_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alpaca = train(&write_jsonl(d, "alpaca.jsonl", &alpaca_rows()), &d.join("a"));
    assert!(alpaca.iter().all(|&(l, t)| l.is_finite() && t > 0), "{alpaca:?}");
    let array = d.join("alpaca.json");
    std::fs::write(&array, Value::Array(alpaca_rows()).to_string()).unwrap();
    assert_eq!(train(&array, &d.join("b")), alpaca, "Alpaca JSON array");
    assert_eq!(train(&Path::new(FIXTURES).join("alpaca.snappy.parquet"), &d.join("c")), alpaca, "Alpaca Parquet");

    // ShareGPT turns become the chat template's user/assistant/system messages, loss on the replies only.
    let messages: Vec<Value> = vec![
        json!({"messages": [{"role": "system", "content": "be brief."},
            {"role": "user", "content": "what is the answer?"}, {"role": "assistant", "content": "42."}]}),
        json!({"messages": [{"role": "user", "content": "hi!"}, {"role": "assistant", "content": "hello."}]}),
    ];
    let chat = train(&write_jsonl(d, "chat.jsonl", &messages), &d.join("d"));
    let array = d.join("sharegpt.json");
    std::fs::write(&array, Value::Array(sharegpt_rows()).to_string()).unwrap();
    assert_eq!(train(&array, &d.join("e")), chat, "ShareGPT JSON array");
    assert_eq!(train(&write_jsonl(d, "sharegpt.jsonl", &sharegpt_rows()), &d.join("f")), chat, "ShareGPT JSONL");
    assert_eq!(train(&Path::new(FIXTURES).join("sharegpt.snappy.parquet"), &d.join("g")), chat, "ShareGPT Parquet");
}

#[test]
fn bad_rows_and_codecs_are_one_line_naming_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    let mut rows = sharegpt_rows();
    rows.push(json!({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}));
    std::fs::write(&bad, Value::Array(rows).to_string()).unwrap();
    let run = |data: &Path, out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec!["finetune", "--model", MODEL, "--data", data.to_str().unwrap()];
        args.extend(["--out", out.to_str().unwrap(), "--max-steps", "1", "--max-seq-len", "64", "--device", "cpu"]);
        args.extend(extra);
        qlora_rt(&args)
    };
    let err = common::last_error_line(&run(&bad, "a", &[]));
    assert!(err.contains("bad.json: row 3: conversations[1]: unknown \"from\": \"bot\""), "{err}");
    let skipped = run(&bad, "b", &["--skip-bad-lines"]);
    assert!(skipped.status.success(), "{}", String::from_utf8_lossy(&skipped.stderr));
    assert!(String::from_utf8_lossy(&skipped.stderr).contains("skipped 1 malformed row(s) (row 3:"));
    let err = common::last_error_line(&run(&Path::new(FIXTURES).join("text.zstd.parquet"), "c", &[]));
    assert!(err.contains("text.zstd.parquet: column text: compressed with ZSTD"), "{err}");
}
