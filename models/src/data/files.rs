//! Dataset files as they come, by content: Parquet (what Hugging Face datasets store), a JSON array of rows
//! (Alpaca and ShareGPT dumps), or JSONL. Every row goes through [`parse_record`], so the column detection,
//! the masking downstream and the per-row errors are the same whatever the file.

use super::jsonl::{parse_record, read_jsonl, Records, RowAt};
use super::parquet::read_parquet;
use crate::error::{Error, Result};
use serde_json::Value;
use std::io::Read;
use std::path::Path;

/// How a file's rows are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Parquet,
    JsonArray,
    Jsonl,
}

/// Parquet by its `PAR1` magic, a JSON array by a leading `[`, else JSONL; a `.json` file written by
/// `datasets`' `to_json` is JSON lines, so the extension alone cannot tell.
pub fn detect(path: &Path) -> Result<FileKind> {
    let mut head = [0u8; 4096];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    if head[..n].starts_with(b"PAR1") {
        return Ok(FileKind::Parquet);
    }
    // A UTF-8 byte order mark may precede the text.
    let text = head[..n].strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&head[..n]);
    Ok(match text.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => FileKind::JsonArray,
        _ => FileKind::Jsonl,
    })
}

/// Reads the rows of a dataset file of any [`FileKind`]. A malformed row is an error naming the file and the
/// row ("line N" in JSONL, "row N" otherwise, from 1), or with `skip_bad_rows` is counted and skipped.
pub fn read_records(path: &Path, skip_bad_rows: bool) -> Result<Records> {
    match detect(path)? {
        FileKind::Parquet => read_parquet(path, skip_bad_rows),
        FileKind::JsonArray => read_json_array(path, skip_bad_rows),
        FileKind::Jsonl => read_jsonl(path, skip_bad_rows),
    }
}

/// Reads a file holding one JSON array of row objects.
fn read_json_array(path: &Path, skip_bad_rows: bool) -> Result<Records> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let rows: Vec<Value> =
        serde_json::from_str(text.trim_start_matches('\u{feff}')).map_err(|e| Error::json(path, &e))?;
    let mut out = Records::default();
    for (i, row) in rows.iter().enumerate() {
        out.add(path, RowAt { unit: "row", n: i + 1 }, parse_record(row), skip_bad_rows)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::jsonl::{Message, Record};

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn alpaca_and_sharegpt_arrays_read_like_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let alpaca = write(
            &dir,
            "alpaca.json",
            r#"[{"instruction":"add","input":"2 2","output":"4"},{"instruction":"greet","input":"","output":"hi"}]"#,
        );
        assert_eq!(detect(&alpaca).unwrap(), FileKind::JsonArray);
        let r = read_records(&alpaca, false).unwrap();
        assert_eq!(r.records.len(), 2);
        assert_eq!(
            r.records[0],
            Record::Instruction { instruction: "add".into(), input: "2 2".into(), output: "4".into() }
        );
        let sharegpt = write(
            &dir,
            "sharegpt.json",
            "\u{feff}\n [{\"system\":\"Be brief.\",\"conversations\":[{\"from\":\"human\",\"value\":\"Hi\"},\
             {\"from\":\"gpt\",\"value\":\"Hello\"}]}]",
        );
        let m = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
        assert_eq!(
            read_records(&sharegpt, false).unwrap().records,
            vec![Record::Chat(vec![m("system", "Be brief."), m("user", "Hi"), m("assistant", "Hello")])]
        );
        // `datasets`' to_json writes JSON lines under a .json name.
        let lines = write(&dir, "lines.json", "{\"text\":\"a\"}\n{\"text\":\"b\"}\n");
        assert_eq!(read_records(&lines, false).unwrap().records.len(), 2);
    }

    #[test]
    fn bad_rows_name_file_and_row_or_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            &dir,
            "bad.json",
            r#"[{"text":"ok"},{"conversations":[{"from":"tool","value":"x"}]},{"conversations":[{"from":"gpt"}]},7]"#,
        );
        let e = read_records(&path, false).unwrap_err().to_string();
        assert!(e.contains("bad.json: row 2: conversations[0]: unknown \"from\": \"tool\""), "{e}");
        let r = read_records(&path, true).unwrap();
        assert_eq!((r.records.len(), r.skipped), (1, 3));
        assert!(r.skipped_reasons[1].contains("row 3: conversations[0] needs string \"from\" and \"value\""));
        assert!(r.skipped_reasons[2].starts_with("row 4: expected a JSON object"), "{:?}", r.skipped_reasons);
        let broken = write(&dir, "broken.json", "[{\"text\":\"ok\"},\n{\"text\":}]");
        let e = read_records(&broken, false).unwrap_err().to_string();
        assert!(e.contains("broken.json: invalid JSON at line 2"), "{e}");
    }
}
