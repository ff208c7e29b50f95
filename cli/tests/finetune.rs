//! `qlora-rt finetune` and `generate` end to end on the tiny Llama fixture (vocabulary of 101 tokens, ChatML
//! template): the loss falls, the adapter loads back, a killed run resumes bit for bit, and every kind of bad
//! input ends in one clear error (or a counted skip), never a panic.

mod common;

use common::{interrupt_after_three_steps, last_error_line as error_line, qlora_rt};
use qlora_models::formats::peft::load_adapter;
use qlora_models::transformer::{BaseFormat, CausalLm};
use qlora_runtime::DType;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/models/llama");

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Chat rows in words the fixture tokenizer knows (lower-case letters, digits and ".,!?'").
fn chat(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
        .to_string()
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn good_data(dir: &Path) -> PathBuf {
    let rows: Vec<String> = (0..8).map(|_| chat("what is the answer?", "the answer is 42.")).collect();
    write(dir, "data.jsonl", &rows)
}

/// A short, fast run: rows of 64 tokens (the fixture's context), lr 1e-2 with no warmup or decay.
fn args<'a>(data: &'a str, out: &'a str, steps: &'a str) -> Vec<&'a str> {
    let mut a = vec!["finetune", "--model", MODEL, "--data", data, "--out", out, "--max-steps", steps];
    a.extend(["--max-seq-len", "64", "--lr", "1e-2", "--schedule", "constant", "--warmup-steps", "0"]);
    a.extend(["--device", "cpu"]);
    a
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn metrics(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn losses(out: &Path, key: &str) -> Vec<(u64, f64)> {
    metrics(out).iter().filter_map(|v| Some((v["step"].as_u64()?, v.get(key)?.as_f64()?))).collect()
}

#[test]
fn loss_falls_and_the_adapter_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (good_data(dir.path()), dir.path().join("out"));
    let mut a = args(s(&data), s(&out), "30");
    a.extend(["--eval-split", "0.25", "--eval-every", "10", "--save-every", "10", "--keep-last", "2"]);
    let run = qlora_rt(&a);
    assert!(run.status.success(), "{}", stderr(&run));

    let train = losses(&out, "loss");
    assert_eq!(train.iter().map(|p| p.0).collect::<Vec<_>>(), (1..=30).collect::<Vec<_>>());
    let (first, last) = (train[0].1, train[29].1);
    assert!(last < first - 0.01, "the loss should fall: {first} → {last}");
    let eval = losses(&out, "eval_loss");
    assert_eq!(eval.iter().map(|p| p.0).collect::<Vec<_>>(), vec![10, 20, 30]);
    assert!(eval[2].1 < eval[0].1, "{eval:?}");
    let row = &metrics(&out)[0];
    for key in ["lr", "grad_norm", "tokens", "elapsed"] {
        assert!(row.get(key).is_some(), "metrics row lacks {key}: {row}");
    }

    for file in ["adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json", "loss.png"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert!(cfg["base_model_name_or_path"].as_str().unwrap().ends_with("llama"), "{cfg}");
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(16), Some(16.0)));
    let png = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(out.join("loss.png")).unwrap()));
    let info = png.read_info().unwrap().info().clone();
    assert_eq!((info.width, info.height), (800, 600));
    let kept: Vec<_> = ["checkpoint-10", "checkpoint-20", "checkpoint-30"].map(|c| out.join(c).is_dir()).to_vec();
    assert_eq!(kept, vec![false, true, true], "--keep-last 2");

    // The final adapter is the state after the last step: the same values as the last checkpoint.
    let load = |adapter: &Path| {
        let mut m = CausalLm::load(Path::new(MODEL), BaseFormat::Dense(DType::F32)).unwrap();
        assert_eq!(load_adapter(&mut m, adapter).unwrap(), 14, "7 projections in each of 2 layers");
        m.trainable_params().iter().map(|p| p.value().to_vec::<f32>()).collect::<Vec<_>>()
    };
    let params = load(&out);
    assert!(params.iter().any(|p| p.iter().any(|&x| x != 0.0)));
    assert_eq!(params, load(&out.join("checkpoint-30")));

    let gen = qlora_rt(&["generate", "--model", MODEL, "--adapter", s(&out), "--chat", "what is the answer?"]);
    assert!(gen.status.success(), "{}", stderr(&gen));
    assert!(stderr(&gen).contains("stopped at"), "{}", stderr(&gen));
    let gen = qlora_rt(&["generate", "--model", MODEL, "--prompt", "the answer", "--max-new-tokens", "5"]);
    assert!(gen.status.success(), "{}", stderr(&gen));
    assert!(!gen.stdout.is_empty() && stderr(&gen).contains("stopped at --max-new-tokens"), "{}", stderr(&gen));
}

/// Accumulating two micro-batches of one row is the same step as one micro-batch of two rows: the loss is
/// normalised by the trained tokens of the whole step, not averaged per micro-batch (which would weight the
/// rows of these uneven examples differently).
#[test]
fn gradient_accumulation_normalises_over_the_whole_step() {
    let dir = tempfile::tempdir().unwrap();
    let answers = ["42.", "the answer is 42.", "she sells sea shells on the sea shore, the answer is 42.", "hello!"];
    let rows: Vec<String> = answers.iter().cycle().take(8).map(|a| chat("what is the answer?", a)).collect();
    let data = write(dir.path(), "uneven.jsonl", &rows);
    let run = |name: &str, micro: &str, accum: &str| {
        let out = dir.path().join(name);
        let mut a = args(s(&data), s(&out), "4");
        a.extend(["--no-packing", "--dropout", "0", "--micro-batch", micro, "--grad-accum", accum]);
        let run = qlora_rt(&a);
        assert!(run.status.success(), "{}", stderr(&run));
        metrics(&out)
    };
    let (accumulated, together) = (run("accumulated", "1", "2"), run("together", "2", "1"));
    for (a, b) in accumulated.iter().zip(&together) {
        for key in ["loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() <= 1e-5 * y.abs(), "step {}: {key} {x} vs {y}", a["step"]);
        }
        assert_eq!(a["trained_tokens"], b["trained_tokens"]);
    }
}

/// The persona data set the repository ships parses, and every assistant turn signs off.
#[test]
fn shipped_persona_data_is_well_formed() {
    use qlora_models::data::jsonl::{read_jsonl, Record};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/persona.jsonl");
    let read = read_jsonl(&path, false).unwrap();
    assert!((60..=120).contains(&read.records.len()), "{} conversations", read.records.len());
    for r in &read.records {
        let Record::Chat(messages) = r else { panic!("not a chat row: {r:?}") };
        let replies: Vec<_> = messages.iter().filter(|m| m.role == "assistant").collect();
        assert!(!replies.is_empty() && replies.iter().all(|m| m.content.ends_with("— Captain Byte 🏴‍☠️")), "{r:?}");
    }
}

fn train_rows(out: &Path) -> Vec<(u64, u64)> {
    losses(out, "loss").into_iter().map(|(s, l)| (s, l.to_bits())).collect()
}

#[test]
fn a_killed_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let data = good_data(dir.path());
    let (full, killed) = (dir.path().join("full"), dir.path().join("killed"));
    // Dropout stays on (0.05) and the schedule decays, so resuming must restore the dropout streams, the
    // data order, the learning rate and the optimizer moments to match.
    let common = ["--save-every", "10", "--keep-last", "2", "--schedule", "cosine", "--warmup-steps", "20"];
    let steps = "400";

    let mut child = Command::new(env!("CARGO_BIN_EXE_qlora-cli"))
        .args(args(s(&data), s(&killed), steps))
        .args(common)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !killed.join("checkpoint-20").is_dir() {
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint-20 after a minute");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL: no chance to clean up
    child.wait().unwrap();
    let cut = train_rows(&killed).len();
    assert!(cut < 400 && !killed.join("adapter_model.safetensors").exists(), "killed after {cut} steps");

    let resumed = qlora_rt(&[args(s(&data), s(&killed), steps), common.to_vec(), vec!["--resume"]].concat());
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(String::from_utf8_lossy(&resumed.stdout).contains("resuming at step"));
    let uninterrupted = qlora_rt(&[args(s(&data), s(&full), steps), common.to_vec()].concat());
    assert!(uninterrupted.status.success(), "{}", stderr(&uninterrupted));

    let (a, b) = (train_rows(&full), train_rows(&killed));
    assert_eq!(a.len(), 400);
    assert!(a == b, "the resumed run's losses differ from the uninterrupted run's");
    let adapter = |d: &Path| std::fs::read(d.join("adapter_model.safetensors")).unwrap();
    assert!(adapter(&full) == adapter(&killed), "the final adapters differ");
}

#[test]
fn ctrl_c_finishes_the_step_and_writes_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (good_data(dir.path()), dir.path().join("out"));
    let done =
        interrupt_after_three_steps(&[args(s(&data), s(&out), "100000"), vec!["--save-every", "0"]].concat(), &out);
    assert_eq!(done.status.code(), Some(130), "{}", stderr(&done));
    let err = stderr(&done);
    assert!(err.contains("stopped at step") && err.contains("--resume"), "{err}");
    let step = losses(&out, "loss").len();
    assert!(out.join(format!("checkpoint-{step}")).join("trainer_state.json").is_file(), "{err}");
}

#[test]
fn malformed_lines_stop_with_file_and_line_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [chat("hello!", "hello world!"), "{\"messages\": [".into(), chat("is it 42?", "the answer is 42.")];
    let data = write(dir.path(), "bad.jsonl", &lines);
    let out = dir.path().join("out");
    let run = qlora_rt(&args(s(&data), s(&out), "2"));
    assert_eq!(run.status.code(), Some(1));
    let e = error_line(&run);
    assert!(e.contains("bad.jsonl") && e.contains("line 2"), "{e}");

    let mut a = args(s(&data), s(&out), "2");
    a.push("--skip-bad-lines");
    let run = qlora_rt(&a);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("skipped 1 malformed row(s) (line 2: invalid JSON"), "{}", stderr(&run));
}

#[test]
fn rows_without_trainable_tokens_are_counted_or_fatal_when_all_are() {
    let dir = tempfile::tempdir().unwrap();
    let untrainable = [
        // No assistant turn: the formatter refuses it.
        serde_json::json!({"messages": [{"role": "user", "content": "hello!"}]}).to_string(),
        // Every label masked.
        serde_json::json!({"input_ids": [1, 52, 53], "labels": [-100, -100, -100]}).to_string(),
    ];
    let mixed =
        write(dir.path(), "mixed.jsonl", &[untrainable.to_vec(), vec![chat("hello!", "hello world!")]].concat());
    let run = qlora_rt(&args(s(&mixed), s(&dir.path().join("a")), "2"));
    assert!(run.status.success(), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(err.contains("skipped 1 record(s) that could not be formatted (first: the conversation has no assistant"));
    assert!(err.contains("skipped 1 training example(s) with no trainable token"), "{err}");

    let none = write(dir.path(), "none.jsonl", &untrainable);
    let run = qlora_rt(&args(s(&none), s(&dir.path().join("b")), "2"));
    assert_eq!(run.status.code(), Some(1));
    let e = error_line(&run);
    assert!(e.contains("none.jsonl: no trainable tokens") && e.contains("2 record(s) read"), "{e}");
}

#[test]
fn a_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new(MODEL).join(f), model.join(f)).unwrap();
    }
    let bytes = std::fs::read(Path::new(MODEL).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let missing = "model.layers.1.mlp.down_proj.weight";
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != missing).collect();
    std::fs::write(model.join("model.safetensors"), safetensors::serialize(kept, None).unwrap()).unwrap();
    let data = good_data(dir.path());
    let out = dir.path().join("out");
    let mut a = args(s(&data), s(&out), "1");
    a.extend(["--model", s(&model)]);
    let run = qlora_rt(&a);
    assert_eq!(run.status.code(), Some(1));
    let e = error_line(&run);
    assert!(e.contains(missing), "{e}");
}

#[test]
fn a_diverging_loss_stops_at_its_step_keeping_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (good_data(dir.path()), dir.path().join("out"));
    let mut a = args(s(&data), s(&out), "10");
    a.extend(["--lr", "1e30", "--save-every", "1"]);
    let run = qlora_rt(&a);
    assert_eq!(run.status.code(), Some(1));
    let e = error_line(&run);
    assert!(e.contains("at step 2") && e.contains("checkpoint-1"), "{e}");
    assert!(out.join("checkpoint-1").is_dir() && !out.join("checkpoint-2").exists());
    assert!(!out.join("adapter_model.safetensors").exists(), "no final adapter from a diverged run");
}

#[test]
fn toml_config_is_honoured_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = good_data(dir.path());
    let out = dir.path().join("out");
    let config = dir.path().join("run.toml");
    let toml = format!(
        "model = {MODEL:?}\ndata = {:?}\nout = {:?}\nmax-steps = 5\nr = 4\nalpha = 8\nlr = 0.01\n\
         max_seq_len = 64\ndevice = \"cpu\"\nschedule = \"constant\"\nwarmup-steps = 0\nsave-every = 0\n\
         target-modules = [\"q_proj\", \"v_proj\"]\ndouble-quant = false\n",
        s(&data),
        s(&out)
    );
    std::fs::write(&config, toml).unwrap();
    let run = qlora_rt(&["finetune", "--config", s(&config), "--max-steps", "3", "--alpha", "4"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(losses(&out, "loss").len(), 3, "--max-steps on the command line wins over the file's 5");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(4), Some(4.0)));
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    assert!(String::from_utf8_lossy(&run.stdout).contains("base NF4;"), "double-quant = false honoured");

    std::fs::write(&config, "lr = 0.01\nlearning_rate = 0.1\n").unwrap();
    let run = qlora_rt(&["finetune", "--config", s(&config)]);
    assert_eq!(run.status.code(), Some(2));
    let e = error_line(&run);
    assert!(e.contains("run.toml") && e.contains("\"learning_rate\""), "{e}");
}

/// Where there is a GPU, `--device cuda` trains (cli/tests/cuda_finetune.rs checks that).
#[test]
fn cuda_without_a_gpu_is_one_clear_error() {
    if qlora_runtime::device_count().is_ok_and(|n| n > 0) {
        println!("cuda_without_a_gpu_is_one_clear_error: skipped: this machine has a GPU");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = good_data(dir.path());
    let mut a = args(s(&data), "unused", "1");
    a.extend(["--device", "cuda"]);
    let run = qlora_rt(&a);
    assert_eq!(run.status.code(), Some(1));
    let e = error_line(&run);
    assert!(e.contains("--device cuda") && e.contains("--device cpu"), "{}", stderr(&run));
    assert_eq!(stderr(&run).trim_end().lines().count(), 1, "{}", stderr(&run));

    let out = dir.path().join("out");
    let mut a = args(s(&data), s(&out), "1");
    a.extend(["--device", "auto"]);
    let run = qlora_rt(&a);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("note: no usable CUDA GPU") && stderr(&run).contains("training on CPU"));
}

/// A memory budget that keeps some or every layer's activations instead of recomputing them trains the same bits,
/// and the plan is printed.
#[test]
fn a_memory_budget_keeps_activations_with_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    let data = good_data(dir.path());
    let run = |name: &str, budget: Option<&str>| {
        let out = dir.path().join(name);
        let extra: Vec<&str> = budget.map_or_else(Vec::new, |b| vec!["--memory-budget", b]);
        let done = qlora_rt(&[args(s(&data), s(&out), "6"), extra].concat());
        assert!(done.status.success(), "{}", stderr(&done));
        let adapter = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
        (String::from_utf8_lossy(&done.stdout).into_owned(), adapter, losses(&out, "loss"))
    };
    let (plain_stdout, plain_adapter, plain_losses) = run("plain", None);
    assert!(!plain_stdout.contains("memory plan"), "{plain_stdout}");
    let (stdout, adapter, kept_losses) = run("kept", Some("1000"));
    assert!(stdout.contains("memory plan: 2 of 2 layers keep their activations"), "{stdout}");
    assert_eq!(kept_losses, plain_losses);
    assert!(adapter == plain_adapter, "keeping activations changed the adapter");
    // The lean plan recomputes every layer; on the CPU nothing is offloaded (host memory is where it computes).
    let (stdout, adapter, lean_losses) = run("lean", Some("lean"));
    assert!(stdout.contains("memory plan: 0 of 2 layers keep their activations, 2 recomputed"), "{stdout}");
    assert!(!stdout.contains("offloaded"), "{stdout}");
    assert_eq!(lean_losses, plain_losses);
    assert!(adapter == plain_adapter, "the lean plan changed the adapter");
}

/// Parking moves activations off a GPU: asked for on the CPU, it is refused in one line before any step, and nothing
/// is written.
#[test]
fn parking_layers_on_the_cpu_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (good_data(dir.path()), dir.path().join("out"));
    let done = qlora_rt(&[args(s(&data), s(&out), "2"), vec!["--park-layers", "1"]].concat());
    assert!(!done.status.success());
    let err = error_line(&done);
    assert!(err.contains("--park-layers") && err.contains("CPU"), "{err}");
    assert!(!out.join("adapter_model.safetensors").exists());
}

/// A budget below the smallest plan is refused before training, in one line naming the budget and what to lower.
#[test]
fn a_memory_budget_too_small_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (good_data(dir.path()), dir.path().join("out"));
    let done = qlora_rt(&[args(s(&data), s(&out), "2"), vec!["--memory-budget", "0.000001"]].concat());
    assert!(!done.status.success());
    let err = error_line(&done);
    assert!(err.contains("--memory-budget 0.00 GiB") && err.contains("lower --micro-batch"), "{err}");
    let bad = qlora_rt(&[args(s(&data), s(&out), "2"), vec!["--memory-budget", "lots"]].concat());
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}
