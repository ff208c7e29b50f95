//! Parquet dataset files (what Hugging Face datasets store) through the `parquet` crate's row reader, without
//! arrow. Each row becomes the JSON object a JSONL line would hold (strings, integers, lists, structs), so
//! [`parse_record`] detects its columns as it does a line's.

use super::jsonl::{parse_record, Records, RowAt};
use crate::error::{Error, Result};
use parquet::basic::Compression;
use parquet::file::metadata::ParquetMetaData;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};
use std::path::Path;

/// Reads every row of a Parquet file.
pub fn read_parquet(path: &Path, skip_bad_rows: bool) -> Result<Records> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |at: &str, e: parquet::errors::ParquetError| Error::config(path, at, e.to_string());
    let reader = SerializedFileReader::new(file).map_err(|e| bad("Parquet footer", e))?;
    check_codecs(path, reader.metadata())?;
    let mut out = Records::default();
    for (i, row) in reader.get_row_iter(None).map_err(|e| bad("Parquet schema", e))?.enumerate() {
        let at = RowAt { unit: "row", n: i + 1 };
        // A row that does not decode means a damaged file, not a bad record: never skipped.
        let row = row.map_err(|e| bad(&at.to_string(), e))?;
        out.add(path, at, row_json(&row).and_then(|v| parse_record(&v)), skip_bad_rows)?;
    }
    Ok(out)
}

/// Refuses, up front and by name, a codec this build leaves out: only uncompressed and snappy (the default of
/// pyarrow and of `datasets`) are compiled in, to keep the build free of C codecs.
fn check_codecs(path: &Path, meta: &ParquetMetaData) -> Result<()> {
    for column in meta.row_groups().iter().flat_map(|g| g.columns()) {
        let codec = column.compression();
        if !matches!(codec, Compression::UNCOMPRESSED | Compression::SNAPPY) {
            // "ZSTD", not "ZSTD(ZstdLevel(1))": the level does not matter to a reader.
            let codec = codec.to_string().split('(').next().unwrap_or_default().to_string();
            return Err(Error::config(
                path,
                &format!("column {}", column.column_path().string()),
                format!(
                    "compressed with {codec}; qlora-rt reads uncompressed or snappy Parquet files (re-save it with \
                     compression=\"snappy\", or as JSONL)"
                ),
            ));
        }
    }
    Ok(())
}

/// A row's conversion: what is wrong with it, for the caller to name the file and row.
type RowResult<T> = std::result::Result<T, String>;

fn row_json(row: &Row) -> RowResult<Value> {
    row.get_column_iter()
        .map(|(name, field)| Ok((name.clone(), field_json(field)?)))
        .collect::<RowResult<Map<_, _>>>()
        .map(Value::Object)
}

fn field_json(field: &Field) -> RowResult<Value> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float(x) => Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        Field::Double(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
        Field::Str(s) => Value::String(s.clone()),
        // Text written without the UTF8 annotation arrives as bytes.
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.into()),
            Err(_) => return Err("a binary column holds bytes that are not UTF-8 text".into()),
        },
        Field::Group(row) => row_json(row)?,
        Field::ListInternal(list) => Value::Array(list.elements().iter().map(field_json).collect::<RowResult<_>>()?),
        Field::MapInternal(map) => Value::Object(
            map.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match field_json(k)? {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    Ok((key, field_json(v)?))
                })
                .collect::<RowResult<_>>()?,
        ),
        // Dates, times, decimals, half floats: no record field uses them; their text keeps the row readable.
        other => Value::String(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::jsonl::{Message, Record};
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    /// One leaf column's values with their definition and repetition levels (Dremel encoding).
    enum Column<'a> {
        Text(&'a [&'a str], &'a [i16], &'a [i16]),
        Int(&'a [i64], &'a [i16], &'a [i16]),
    }

    fn write(path: &Path, schema: &str, compression: Compression, columns: &[Column]) {
        let schema = Arc::new(parse_message_type(schema).unwrap());
        let props = Arc::new(WriterProperties::builder().set_compression(compression).build());
        let mut writer = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        for column in columns {
            let mut w = group.next_column().unwrap().unwrap();
            match column {
                Column::Text(v, d, r) => {
                    let v: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(*s)).collect();
                    w.typed::<ByteArrayType>().write_batch(&v, Some(d), Some(r)).unwrap();
                }
                Column::Int(v, d, r) => {
                    w.typed::<Int64Type>().write_batch(v, Some(d), Some(r)).unwrap();
                }
            }
            w.close().unwrap();
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    const CHAT: &str = "message schema {
        optional group messages (LIST) { repeated group list { optional group element {
            optional binary role (UTF8); optional binary content (UTF8); } } }
    }";

    #[test]
    fn chat_alpaca_and_token_columns_read_like_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.parquet");
        // Two rows: [user "hi", assistant "hello"] and [user "bye"] (a one-turn chat is still a record).
        let (d, r) = ([4, 4, 4], [0, 1, 0]);
        let roles = Column::Text(&["user", "assistant", "user"], &d, &r);
        write(&path, CHAT, Compression::SNAPPY, &[roles, Column::Text(&["hi", "hello", "bye"], &d, &r)]);
        assert_eq!(super::super::files::detect(&path).unwrap(), super::super::files::FileKind::Parquet);
        let m = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
        let read = super::super::files::read_records(&path, false).unwrap();
        assert_eq!(
            read.records,
            vec![Record::Chat(vec![m("user", "hi"), m("assistant", "hello")]), Record::Chat(vec![m("user", "bye")])]
        );

        let alpaca = "message schema { required binary instruction (UTF8); optional binary input (UTF8); \
                      required binary output (UTF8); }";
        let path = dir.path().join("alpaca.parquet");
        let columns = [
            Column::Text(&["add", "greet"], &[0, 0], &[0, 0]),
            Column::Text(&["2 2"], &[1, 0], &[0, 0]),
            Column::Text(&["4", "hi"], &[0, 0], &[0, 0]),
        ];
        write(&path, alpaca, Compression::UNCOMPRESSED, &columns);
        let read = read_parquet(&path, false).unwrap();
        assert_eq!(
            read.records[1],
            Record::Instruction { instruction: "greet".into(), input: String::new(), output: "hi".into() }
        );

        let tokens =
            "message schema { optional group input_ids (LIST) { repeated group list { optional int64 element; } } }";
        let path = dir.path().join("tokens.parquet");
        write(&path, tokens, Compression::SNAPPY, &[Column::Int(&[5, 6, 7], &[3, 3, 3], &[0, 1, 1])]);
        assert_eq!(
            read_parquet(&path, false).unwrap().records,
            vec![Record::Tokens { input_ids: vec![5, 6, 7], labels: None }]
        );
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data").join(name)
    }

    #[test]
    fn pyarrow_files_read() {
        let alpaca = read_parquet(&fixture("alpaca.snappy.parquet"), false).unwrap().records;
        assert_eq!(alpaca.len(), 8);
        let add = Record::Instruction {
            instruction: "add the numbers.".into(),
            input: "2 and 2".into(),
            output: "it is 4.".into(),
        };
        assert_eq!(alpaca[1], add);
        let chats = read_parquet(&fixture("sharegpt.snappy.parquet"), false).unwrap().records;
        let m = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
        assert_eq!(
            chats,
            vec![
                Record::Chat(vec![m("system", "be brief."), m("user", "what is the answer?"), m("assistant", "42.")]),
                Record::Chat(vec![m("user", "hi!"), m("assistant", "hello.")]),
            ]
        );
    }

    #[test]
    fn bad_rows_and_codecs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.parquet");
        // Row 2 has an assistant turn without content.
        let roles = Column::Text(&["user", "assistant", "user", "assistant"], &[4, 4, 4, 4], &[0, 1, 0, 1]);
        let contents = Column::Text(&["q", "a", "q"], &[4, 4, 4, 3], &[0, 1, 0, 1]);
        write(&path, CHAT, Compression::SNAPPY, &[roles, contents]);
        let e = read_parquet(&path, false).unwrap_err().to_string();
        assert!(e.contains("bad.parquet: row 2: messages[1] needs string \"role\" and \"content\""), "{e}");
        let r = read_parquet(&path, true).unwrap();
        assert_eq!((r.records.len(), r.skipped), (1, 1));

        // Made by pyarrow (scripts/reference/parquet_fixtures.py): a codec left out of this build.
        let e = read_parquet(&fixture("text.zstd.parquet"), false).unwrap_err().to_string();
        assert!(e.contains("text.zstd.parquet: column text: compressed with ZSTD"), "{e}");
        let path = dir.path().join("cut.parquet");
        std::fs::write(&path, b"PAR1 not really").unwrap();
        let e = read_parquet(&path, false).unwrap_err().to_string();
        assert!(e.contains("cut.parquet: Parquet footer"), "{e}");
    }
}
