//! Records → examples → packed batches with the tiny llama fixture's tokenizer (BPE, ChatML template).

use qlora_models::data::jsonl::{parse_record, Record};
use qlora_models::data::pack::{pack, row_batch};
use qlora_models::data::tokenize::Formatter;
use qlora_models::formats::tokenizer::Tokenizer;
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    Tokenizer::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama")).unwrap()
}

fn record(json: &str) -> Record {
    parse_record(&serde_json::from_str(json).unwrap()).unwrap()
}

fn trained_text(tok: &Tokenizer, ids: &[i32], labels: &[i32]) -> String {
    let kept: Vec<u32> = ids.iter().zip(labels).filter(|(_, &l)| l >= 0).map(|(&i, _)| i as u32).collect();
    tok.decode(&kept, false).unwrap()
}

#[test]
fn chat_trains_only_assistant_turns_and_their_end_marker() {
    let tok = tokenizer();
    let f = Formatter::new(&tok, None, false).unwrap();
    let r = record(r#"{"messages":[{"role":"user","content":"hello there"},{"role":"assistant","content":"hi"}]}"#);
    let ex = f.example(&r).unwrap();
    assert_eq!(ex.ids.len(), ex.labels.len());
    assert_eq!(ex.ids[0], 1, "the template writes BOS");
    let trained = trained_text(&tok, &ex.ids, &ex.labels);
    assert!(trained.contains("hi") && trained.contains("<|im_end|>") && !trained.contains("hello"), "{trained:?}");
    let everything = Formatter::new(&tok, None, true).unwrap().example(&r).unwrap();
    assert_eq!(everything.labels, everything.ids);
}

#[test]
fn other_shapes_and_bad_rows() {
    let tok = tokenizer();
    let f = Formatter::new(&tok, None, false).unwrap();
    let pc = f.example(&record(r#"{"prompt":"the cat","completion":" sat"}"#)).unwrap();
    assert_eq!(pc.ids[0], 1, "BOS from add_bos_token");
    assert_eq!(*pc.ids.last().unwrap(), 2, "EOS closes the completion");
    assert!(pc.labels[0] < 0 && *pc.labels.last().unwrap() == 2);
    let text = f.example(&record(r#"{"text":"the cat sat"}"#)).unwrap();
    assert_eq!(text.labels, text.ids);
    let tokens = f.example(&record(r#"{"input_ids":[5,6,7],"labels":[-100,6,7]}"#)).unwrap();
    assert_eq!((tokens.ids, tokens.labels), (vec![5, 6, 7], vec![-100, 6, 7]));
    let e = f.example(&record(r#"{"input_ids":[5,1000]}"#)).unwrap_err();
    assert!(e.contains("1000") && e.contains("vocabulary"), "{e}");
    let e = f.example(&record(r#"{"messages":[{"role":"user","content":"only a question"}]}"#)).unwrap_err();
    assert!(e.contains("no assistant"), "{e}");
}

#[test]
fn packed_rows_become_batches() {
    let tok = tokenizer();
    let f = Formatter::new(&tok, None, false).unwrap();
    let examples: Vec<_> = ["the cat", "a dog sat on the mat", "hello"]
        .iter()
        .map(|t| f.example(&Record::Text(t.to_string())).unwrap())
        .collect();
    let (rows, stats) = pack(examples, 64);
    assert_eq!((rows.len(), stats.truncated), (1, 0));
    let batch = row_batch(&rows[0]).unwrap();
    assert_eq!(batch.cu_seqlens.host().len(), 4);
}
