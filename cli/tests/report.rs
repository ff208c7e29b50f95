//! What `qlora-rt finetune` leaves for people to read: TensorBoard event files with `--report-to tensorboard`
//! (decoded here, framing and CRCs checked, against metrics.jsonl) and a titled, two-panel loss.png.

mod common;

use common::qlora_rt;
use qlora_models::formats::tfevents::read_events;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/llama");

fn finetune(data: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["finetune", "--model", MODEL, "--data", data.to_str().unwrap(), "--out"];
    args.extend([out.to_str().unwrap(), "--max-seq-len", "64", "--device", "cpu", "--lr", "1e-2"]);
    args.extend(extra);
    let run = qlora_rt(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
}

fn data(dir: &Path) -> PathBuf {
    let row = serde_json::json!({"messages": [{"role": "user", "content": "what is the answer?"},
        {"role": "assistant", "content": "the answer is 42."}]});
    let path = dir.join("data.jsonl");
    std::fs::write(&path, format!("{row}\n").repeat(8)).unwrap();
    path
}

fn event_files(out: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect();
    files.sort();
    files
}

#[test]
fn tensorboard_events_hold_what_metrics_jsonl_holds() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let flags = ["--max-steps", "4", "--eval-split", "0.25", "--eval-every", "2", "--report-to", "tensorboard"];
    finetune(&data(dir.path()), &out, &flags);
    let files = event_files(&out);
    assert_eq!(files.len(), 1, "{files:?}");
    let events = read_events(&files[0]).unwrap();
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    // (step, tag) → value, from the events and from metrics.jsonl.
    let mut logged = BTreeMap::new();
    for e in &events[1..] {
        for (tag, value) in &e.scalars {
            assert!(logged.insert((e.step as u64, tag.clone()), *value).is_none(), "{tag} twice at {}", e.step);
        }
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    for row in text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()) {
        let step = row["step"].as_u64().unwrap();
        for (key, tag) in [("loss", "train/loss"), ("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm")]
            .into_iter()
            .chain([("eval_loss", "eval/loss")])
        {
            if let Some(v) = row.get(key).and_then(Value::as_f64) {
                assert_eq!(logged.get(&(step, tag.to_string())), Some(&(v as f32)), "{tag} at step {step}");
            }
        }
    }
    for step in 1..=4u64 {
        for tag in ["train/tokens_per_second", "memory/current_gib", "memory/peak_gib"] {
            assert!(logged.get(&(step, tag.to_string())).is_some_and(|v| *v > 0.0), "{tag} at step {step}");
        }
    }
    assert!(logged.contains_key(&(2, "eval/loss".into())) && logged.contains_key(&(4, "eval/loss".into())));

    // Without the flag, no event file.
    let plain = dir.path().join("plain");
    finetune(&data(dir.path()), &plain, &["--max-steps", "1"]);
    assert!(event_files(&plain).is_empty());
}

#[test]
fn a_resumed_run_tells_tensorboard_to_drop_the_redone_steps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let data = data(dir.path());
    finetune(&data, &out, &["--max-steps", "2", "--save-every", "1", "--report-to", "tensorboard"]);
    // Resume from step 1's checkpoint: step 2 is redone.
    let checkpoint = out.join("checkpoint-1");
    let resume = ["--max-steps", "2", "--report-to", "tensorboard", "--resume", checkpoint.to_str().unwrap()];
    finetune(&data, &out, &resume);
    let files = event_files(&out);
    assert_eq!(files.len(), 2, "{files:?}");
    let events: Vec<_> = files.iter().flat_map(|f| read_events(f).unwrap()).collect();
    let start = events.iter().find(|e| e.session_status == Some(1)).expect("a SessionLog START");
    assert_eq!(start.step, 2);
}

#[test]
fn loss_png_is_titled_with_two_panels() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    finetune(&data(dir.path()), &out, &["--max-steps", "6", "--eval-split", "0.25", "--eval-every", "3"]);
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(out.join("loss.png")).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut px = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut px).unwrap();
    assert_eq!((info.width, info.height), (800, 600));
    // Train (blue), eval (orange) and learning rate (green) are all drawn.
    for color in [[31, 119, 180], [255, 127, 14], [44, 160, 44]] {
        assert!(px.chunks_exact(3).any(|p| p == color), "{color:?}");
    }
    // The title rows (above the loss panel) hold lettering.
    let dark = |row: usize| px[row * 2400..(row + 1) * 2400].chunks_exact(3).filter(|p| p[0] < 100).count();
    assert!((10..26).map(dark).sum::<usize>() > 100 && (36..44).map(dark).sum::<usize>() > 100);
}
