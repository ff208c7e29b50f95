//! Training and evaluation records from JSONL files, in the shapes people have: chat (`messages` with
//! `role`/`content`, or ShareGPT's `conversations` with `from`/`value`), prompt/completion,
//! instruction/input/output (Alpaca), plain text, and pre-tokenized ids. [`parse_record`] interprets one row
//! whatever file it came from (JSONL here; JSON arrays and Parquet in [`super::files`]).

use crate::error::{Error, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Chat(Vec<Message>),
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    /// Alpaca-style; `input` may be empty.
    Instruction {
        instruction: String,
        input: String,
        output: String,
    },
    /// Continued pre-training: every token is trained.
    Text(String),
    /// Already tokenized; `labels` (−100 = not trained) defaults to the ids. No BOS or template is added.
    Tokens {
        input_ids: Vec<i32>,
        labels: Option<Vec<i32>>,
    },
}

/// Where in its file a row was read: a JSONL line or a row of a JSON array or Parquet file, from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowAt {
    pub unit: &'static str,
    pub n: usize,
}

impl std::fmt::Display for RowAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.unit, self.n)
    }
}

/// What reading a file produced.
#[derive(Debug, Default)]
pub struct Records {
    pub records: Vec<Record>,
    /// Where each of `records` was read, for errors found later (an id outside the vocabulary).
    pub at: Vec<RowAt>,
    /// Lines skipped as malformed (only with `skip_bad_lines`); the first few reasons are kept for the log.
    pub skipped: usize,
    pub skipped_reasons: Vec<String>,
}

fn string(v: &Value, key: &str) -> std::result::Result<Option<String>, String> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("\"{key}\" must be a string, got {}", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn ids(v: &Value, key: &str) -> std::result::Result<Vec<i32>, String> {
    let Value::Array(a) = v else { return Err(format!("\"{key}\" must be an array of integers")) };
    a.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_i64()
                .filter(|&n| i32::try_from(n).is_ok())
                .map(|n| n as i32)
                .ok_or_else(|| format!("\"{key}\"[{i}] must be a 32-bit integer, got {x}"))
        })
        .collect()
}

/// ShareGPT's speaker names mapped to the chat-template roles; "model" is Gemma's name for the assistant.
fn sharegpt_role(from: &str) -> Option<&'static str> {
    match from {
        "human" | "user" => Some("user"),
        "gpt" | "assistant" | "model" | "chatgpt" => Some("assistant"),
        "system" => Some("system"),
        _ => None,
    }
}

/// The turns of `messages` (`role`/`content`) or ShareGPT's `conversations` (`from`/`value`; `role`/`content`
/// also accepted there, as some exports use them), with ShareGPT's optional top-level `system` prepended.
fn chat(v: &Value, key: &str, items: &Value) -> std::result::Result<Record, String> {
    let Value::Array(items) = items else { return Err(format!("\"{key}\" must be an array")) };
    let sharegpt = key == "conversations";
    let mut messages = Vec::with_capacity(items.len() + 1);
    if let Some(system) = if sharegpt { string(v, "system")?.filter(|s| !s.is_empty()) } else { None } {
        messages.push(Message { role: "system".into(), content: system });
    }
    for (i, item) in items.iter().enumerate() {
        let field = |k: &str| string(item, k).map_err(|e| format!("{key}[{i}]: {e}"));
        let message = match (field("role")?, field("content")?) {
            (Some(role), Some(content)) => Message { role, content },
            _ if sharegpt => match (field("from")?, field("value")?) {
                (Some(from), Some(content)) => {
                    let role = sharegpt_role(&from).ok_or_else(|| {
                        format!("{key}[{i}]: unknown \"from\": \"{from}\" (expected human, gpt or system)")
                    })?;
                    Message { role: role.into(), content }
                }
                _ => return Err(format!("{key}[{i}] needs string \"from\" and \"value\"")),
            },
            _ => return Err(format!("{key}[{i}] needs string \"role\" and \"content\"")),
        };
        messages.push(message);
    }
    if messages.is_empty() {
        return Err(format!("\"{key}\" is empty"));
    }
    Ok(Record::Chat(messages))
}

/// Interprets one JSON object; the error says what is wrong with it (the caller adds file and line).
pub fn parse_record(v: &Value) -> std::result::Result<Record, String> {
    if !v.is_object() {
        return Err(format!("expected a JSON object, got {}", kind(v)));
    }
    for key in ["messages", "conversations"] {
        if let Some(items) = v.get(key) {
            return chat(v, key, items);
        }
    }
    if let Some(input_ids) = v.get("input_ids") {
        let input_ids = ids(input_ids, "input_ids")?;
        let labels = match v.get("labels") {
            None | Some(Value::Null) => None,
            Some(l) => {
                let l = ids(l, "labels")?;
                if l.len() != input_ids.len() {
                    return Err(format!("\"labels\" has {} entries for {} input_ids", l.len(), input_ids.len()));
                }
                Some(l)
            }
        };
        return Ok(Record::Tokens { input_ids, labels });
    }
    if let (Some(prompt), Some(completion)) = (string(v, "prompt")?, string(v, "completion")?) {
        return Ok(Record::PromptCompletion { prompt, completion });
    }
    if let (Some(instruction), Some(output)) = (string(v, "instruction")?, string(v, "output")?) {
        let input = string(v, "input")?.unwrap_or_default();
        return Ok(Record::Instruction { instruction, input, output });
    }
    if let Some(text) = string(v, "text")? {
        return Ok(Record::Text(text));
    }
    Err("unrecognised record: expected \"messages\", \"conversations\", \"prompt\"+\"completion\", \
         \"instruction\"+\"output\", \"text\" or \"input_ids\""
        .into())
}

impl Records {
    /// Keeps one parsed row, or with `skip_bad` counts it as skipped; otherwise its error names `path` and
    /// `at` ("line 3", "row 3").
    pub(crate) fn add(
        &mut self,
        path: &Path,
        at: RowAt,
        parsed: std::result::Result<Record, String>,
        skip_bad: bool,
    ) -> Result<()> {
        match parsed {
            Ok(r) => {
                self.records.push(r);
                self.at.push(at);
            }
            Err(msg) if skip_bad => {
                self.skipped += 1;
                if self.skipped_reasons.len() < 5 {
                    self.skipped_reasons.push(format!("{at}: {msg}"));
                }
            }
            Err(msg) => return Err(Error::Config { path: path.into(), field: at.to_string(), msg }),
        }
        Ok(())
    }
}

/// Reads a JSONL file. Blank lines are ignored. A malformed line is an error naming the file and line, or,
/// with `skip_bad_lines`, is counted and skipped.
pub fn read_jsonl(path: &Path, skip_bad_lines: bool) -> Result<Records> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Records::default();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(&line)
            .map_err(|e| format!("invalid JSON at column {}: {e}", e.column()))
            .and_then(|v| parse_record(&v));
        out.add(path, RowAt { unit: "line", n: line_no }, parsed, skip_bad_lines)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(lines: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(lines.as_bytes()).unwrap();
        f
    }

    #[test]
    fn every_shape_parses() {
        let f = file(concat!(
            r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}"#,
            "\n\n",
            r#"{"prompt":"2+2=","completion":"4"}"#,
            "\n",
            r#"{"instruction":"add","input":"2 2","output":"4"}"#,
            "\n",
            r#"{"instruction":"greet","output":"hi"}"#,
            "\n",
            r#"{"text":"plain"}"#,
            "\n",
            r#"{"input_ids":[1,2,3],"labels":[-100,2,3]}"#,
            "\n"
        ));
        let r = read_jsonl(f.path(), false).unwrap();
        assert_eq!(r.records.len(), 6);
        assert!(matches!(&r.records[0], Record::Chat(m) if m.len() == 2 && m[1].content == "hello"));
        assert!(matches!(&r.records[3], Record::Instruction { input, .. } if input.is_empty()));
        assert_eq!(r.records[5], Record::Tokens { input_ids: vec![1, 2, 3], labels: Some(vec![-100, 2, 3]) });
    }

    #[test]
    fn bad_lines_name_file_and_line_or_are_skipped() {
        let f = file("{\"text\":\"ok\"}\n{\"text\": 3}\nnot json\n{\"input_ids\":[1],\"labels\":[1,2]}\n");
        let e = read_jsonl(f.path(), false).unwrap_err().to_string();
        assert!(e.contains(&f.path().display().to_string()) && e.contains("line 2") && e.contains("\"text\""), "{e}");
        let r = read_jsonl(f.path(), true).unwrap();
        assert_eq!((r.records.len(), r.skipped), (1, 3));
        assert!(r.skipped_reasons[1].starts_with("line 3: invalid JSON"), "{:?}", r.skipped_reasons);
        assert!(r.skipped_reasons[2].contains("labels"), "{:?}", r.skipped_reasons);
        let missing = read_jsonl(Path::new("/nonexistent/data.jsonl"), false).unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/data.jsonl"), "{missing}");
    }
}
