//! `qlora-rt eval` on the tiny Llama fixture: the loss transformers (and peft) computed for the fixture's token
//! ids, text rows through the fixture tokenizer, packing, and one-line errors naming the file and line.

mod common;

use common::{one_line_error, qlora_rt};
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama")
}

struct Reference {
    ck: Checkpoint,
}

impl Reference {
    fn open() -> Self {
        Reference { ck: Checkpoint::from_files(&[fixture().join("reference.safetensors")]).unwrap() }
    }
    fn ids(&self) -> Vec<i32> {
        self.ck.load("input_ids").unwrap().to_vec::<i32>()
    }
    fn scalar(&self, name: &str) -> f64 {
        self.ck.load(name).unwrap().to_vec::<f64>()[0]
    }
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn ids_row(ids: &[i32]) -> String {
    serde_json::json!({ "input_ids": ids }).to_string()
}

/// Runs eval with --json and returns the parsed last stdout line.
fn eval_json(data: &Path, extra: &[&str]) -> serde_json::Value {
    let model = fixture();
    let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"];
    args.extend(extra);
    let out = qlora_rt(&args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.trim_end().lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {stdout}"))
}

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= 1e-6 + rel * want.abs()
}

#[test]
fn loss_matches_transformers_and_peft() {
    let r = Reference::open();
    let ids = r.ids();
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "ids.jsonl", &[ids_row(&ids)]);

    let v = eval_json(&data, &["--device", "cpu"]);
    let (loss, tokens) = (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap());
    assert!(close(loss, r.scalar("loss"), 1e-5), "loss {loss} vs transformers {}", r.scalar("loss"));
    assert_eq!(tokens as usize, ids.len() - 1);
    assert!(close(v["perplexity"].as_f64().unwrap(), loss.exp(), 1e-12));

    let adapter = fixture().join("adapter");
    let v = eval_json(&data, &["--device", "cpu", "--adapter", adapter.to_str().unwrap()]);
    let lora = v["loss"].as_f64().unwrap();
    assert!(close(lora, r.scalar("lora_loss"), 1e-5), "LoRA loss {lora} vs peft {}", r.scalar("lora_loss"));
}

/// The loss transformers + bitsandbytes get from their NF4 logits (f64 log-softmax of the stored logits).
#[test]
fn nf4_loss_matches_bitsandbytes_logits() {
    let r = Reference::open();
    let ids = r.ids();
    let logits = r.ck.load("nf4_logits").unwrap().to_vec::<f64>();
    let vocab = logits.len() / ids.len();
    let nll: f64 = (0..ids.len() - 1)
        .map(|i| {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            lse - row[ids[i + 1] as usize]
        })
        .sum();
    let want = nll / (ids.len() - 1) as f64;
    let dir = tempfile::tempdir().unwrap();
    let data = write(dir.path(), "ids.jsonl", &[ids_row(&ids)]);
    let v = eval_json(&data, &["--device", "cpu", "--quantize", "nf4", "--double-quant"]);
    let got = v["loss"].as_f64().unwrap();
    assert!(close(got, want, 1e-5), "NF4 loss {got} vs bitsandbytes {want}");
    // bf16 base weights on CPU: f32 compute over bf16-rounded weights, so close to but not exactly f32's loss.
    let v = eval_json(&data, &["--device", "cpu", "--dtype", "bf16"]);
    let bf16 = v["loss"].as_f64().unwrap();
    assert!(close(bf16, r.scalar("loss"), 1e-2) && bf16 != r.scalar("loss"), "bf16 loss {bf16}");
}

#[test]
fn rows_pack_mask_and_tokenize() {
    let r = Reference::open();
    let ids = r.ids();
    let dir = tempfile::tempdir().unwrap();
    // The same row three times, packed two per batch or all in one: the same token-weighted mean.
    let data = write(dir.path(), "three.jsonl", &[ids_row(&ids), String::new(), ids_row(&ids), ids_row(&ids)]);
    for (budget, batches) in [("24", 2), ("4096", 1)] {
        let v = eval_json(&data, &["--device", "cpu", "--batch-tokens", budget]);
        assert_eq!(
            (v["tokens"].as_u64(), v["rows"].as_u64(), v["batches"].as_u64()),
            (Some(33), Some(3), Some(batches))
        );
        assert!(close(v["loss"].as_f64().unwrap(), r.scalar("loss"), 1e-5));
    }

    // Labels: −100 on the first half leaves 5 of the 11 targets; a one-token row predicts nothing.
    let labels: Vec<i32> = ids.iter().enumerate().map(|(i, &t)| if i < 7 { -100 } else { t }).collect();
    let masked = serde_json::json!({ "input_ids": ids, "labels": labels }).to_string();
    let data = write(dir.path(), "masked.jsonl", &[masked, ids_row(&ids[..1])]);
    let v = eval_json(&data, &["--device", "cpu"]);
    assert_eq!((v["tokens"].as_u64(), v["rows"].as_u64()), (Some(5), Some(1)));

    // A text row is its tokenization with BOS: the same loss as the ids row.
    let text = "hello world! the answer is 42.";
    let tokenized: Vec<i32> =
        Tokenizer::load(&fixture()).unwrap().encode(text, true).unwrap().into_iter().map(|i| i as i32).collect();
    assert_eq!(tokenized[0], 1, "BOS first");
    let by_text = eval_json(&write(dir.path(), "text.jsonl", &[serde_json::json!({ "text": text }).to_string()]), &[]);
    let by_ids = eval_json(&write(dir.path(), "tok.jsonl", &[ids_row(&tokenized)]), &[]);
    assert_eq!(by_text["loss"], by_ids["loss"]);
    // The same rows as a JSON array (Alpaca-style dumps, `datasets`' to_json with lines=False): the same result.
    let array = format!("[{}]", serde_json::json!({ "text": text }));
    let by_array = eval_json(&write(dir.path(), "text.json", &[array]), &[]);
    assert_eq!((&by_array["loss"], &by_array["tokens"]), (&by_text["loss"], &by_text["tokens"]));
    assert_eq!(by_text["tokens"].as_u64(), Some(tokenized.len() as u64 - 1));
}

#[test]
fn bad_input_is_one_line_naming_file_and_line() {
    let ids = Reference::open().ids();
    let dir = tempfile::tempdir().unwrap();
    let model = fixture();
    let m = model.to_str().unwrap();
    let adapter = model.join("adapter");
    let a = adapter.to_str().unwrap();
    let cases: [(&str, Vec<String>, &str); 4] = [
        ("json.jsonl", vec![ids_row(&ids), "{\"input_ids\": [1, 2".into()], "line 2: invalid JSON"),
        ("vocab.jsonl", vec![ids_row(&ids), ids_row(&ids), ids_row(&[1, 101])], "line 3: token id 101"),
        ("chat.jsonl", vec![r#"{"messages":[{"role":"user","content":"hi"}]}"#.into()], "line 1: eval reads"),
        ("labels.jsonl", vec![r#"{"input_ids":[1,2,3],"labels":[1,-5,3]}"#.into()], "line 1: label -5"),
    ];
    for (name, lines, expected) in cases {
        let data = write(dir.path(), name, &lines);
        let err = one_line_error(&["eval", "--model", m, "--data", data.to_str().unwrap(), "--device", "cpu"]);
        assert!(err.contains(&format!("{name}: {expected}")), "{err}");
    }
    // A JSON array of rows names the row.
    let array = format!("[{}, {}]", ids_row(&ids), ids_row(&[1, 101]));
    let data = write(dir.path(), "rows.json", &[array]);
    let err = one_line_error(&["eval", "--model", m, "--data", data.to_str().unwrap(), "--device", "cpu"]);
    assert!(err.contains("rows.json: row 2: token id 101"), "{err}");
    let data = write(dir.path(), "ok.jsonl", &[ids_row(&ids)]);
    let d = data.to_str().unwrap();
    if !qlora_runtime::device_count().is_ok_and(|n| n > 0) {
        let err = one_line_error(&["eval", "--model", m, "--data", d, "--device", "cuda"]);
        assert!(err.contains("--device cuda: ") && err.contains("--device cpu"), "{err}");
    }
    // Several adapters are evaluated one by one, so each needs a name to be reported under.
    let err = one_line_error(&["eval", "--model", m, "--data", d, "--adapter", a, "--adapter", a]);
    assert!(err.contains("NAME=DIR"), "{err}");
    let err = one_line_error(&["eval", "--model", m, "--data", d, "--double-quant", "--device", "cpu"]);
    assert!(err.contains("--double-quant needs --quantize nf4"), "{err}");
    let err = one_line_error(&["eval", "--model", m, "--data", "/nonexistent/data.jsonl", "--device", "cpu"]);
    assert!(err.contains("/nonexistent/data.jsonl"), "{err}");
    let empty = write(dir.path(), "empty.jsonl", &[ids_row(&ids[..1])]);
    let err = one_line_error(&["eval", "--model", m, "--data", empty.to_str().unwrap(), "--device", "cpu"]);
    assert!(err.contains("no row has a token to predict"), "{err}");

    // --device auto says in one notice on stderr where it runs: the CPU unless there is a usable GPU.
    let out = qlora_rt(&["eval", "--model", m, "--data", d, "--device", "auto", "--json"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.trim_end().lines().collect();
    let gpu = qlora_runtime::device_count().is_ok_and(|n| n > 0);
    let (start, end) = if gpu {
        ("qlora-rt: note: running on cuda:0", ")")
    } else {
        ("qlora-rt: note: no usable CUDA GPU (", "); running on CPU")
    };
    assert!(lines.len() == 1 && lines[0].starts_with(start) && lines[0].ends_with(end), "{err}");
}
