//! TensorBoard event files (`events.out.tfevents.*`), scalars only, encoded by hand: a TFRecord stream (each
//! record `u64 length | masked CRC32C of the length | data | masked CRC32C of the data`, little-endian) of
//! `tensorflow.Event` protobufs (tensorflow/core/util/event.proto, summary.proto). The first event names the
//! file version; each later one holds a step's scalar summaries. [`read_events`] decodes what [`EventWriter`]
//! writes, checking every CRC, so tests need no TensorBoard.
//!
//! Owns: the framing and the few protobuf fields written. Must not own which scalars a run logs.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum TFRecord uses.
fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// TFRecord's masking (tensorflow/core/lib/hash/crc32c.h `Mask`): a CRC of data that embeds CRCs stays useful.
fn masked_crc(bytes: &[u8]) -> u32 {
    crc32c(bytes).rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited protobuf field (wire type 2).
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), then one of file_version = 3, summary = 5,
/// session_log = 6 }`; `body` is the chosen field already encoded.
fn event(wall_time: f64, step: i64, body: &[u8]) -> Vec<u8> {
    let mut e = vec![0x09];
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10);
    varint(&mut e, step as u64);
    e.extend_from_slice(body);
    e
}

fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Appends events to a new `events.out.tfevents.<time>.<host>.<pid>` file in a folder.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates the file in `dir`. A run resumed after step `resumed_after` first logs a SessionLog START at
    /// the next step, which makes TensorBoard drop what an interrupted run logged past its checkpoint.
    pub fn create(dir: &Path, resumed_after: u64) -> Result<Self> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "localhost".into());
        let name = format!("events.out.tfevents.{:010}.{host}.{}", now() as u64, std::process::id());
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { file, path };
        let mut version = Vec::new();
        bytes_field(&mut version, 3, b"brain.Event:2");
        w.write(&record(&event(now(), 0, &version)))?;
        if resumed_after > 0 {
            // SessionLog { status = 1 (START) }, as field 6 of the Event.
            w.write(&record(&event(now(), resumed_after as i64 + 1, &[0x32, 0x02, 0x08, 0x01])))?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs `scalars` (tag, value) at `step` as one event, written whole with one `write` so that TensorBoard,
    /// reading as the run goes, never sees half of it.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        // Summary { repeated Value value = 1 }, Value { tag = 1, simple_value = 2 (float) }.
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            v.push(0x15);
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        let mut body = Vec::new();
        bytes_field(&mut body, 5, &summary);
        self.write(&record(&event(now(), step as i64, &body)))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| Error::io(&self.path, e))
    }
}

/// One decoded event: its step, and what it held.
#[derive(Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// The scalar summaries (tag, simple_value).
    pub scalars: Vec<(String, f32)>,
    /// A SessionLog's status (1 = START).
    pub session_status: Option<u64>,
}

/// A protobuf reader over one message's bytes, reading the wire types the writer uses.
struct Fields<'a>(&'a [u8]);

enum Wire<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

impl<'a> Fields<'a> {
    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
            self.0 = rest;
            v |= ((b & 0x7f) as u64) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("field of {n} bytes runs past the message"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn next(&mut self) -> std::result::Result<Option<(u64, Wire<'a>)>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(self.take(8)?.try_into().map_err(|_| "short fixed64")?),
            2 => {
                let n = self.varint()? as usize;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Fixed32(self.take(4)?.try_into().map_err(|_| "short fixed32")?),
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, wire)))
    }
}

fn decode_event(data: &[u8]) -> std::result::Result<Event, String> {
    let mut e = Event { wall_time: 0.0, step: 0, file_version: None, scalars: Vec::new(), session_status: None };
    let mut fields = Fields(data);
    while let Some((field, wire)) = fields.next()? {
        match (field, wire) {
            (1, Wire::Fixed64(b)) => e.wall_time = f64::from_le_bytes(b),
            (2, Wire::Varint(v)) => e.step = v as i64,
            (3, Wire::Bytes(b)) => e.file_version = Some(String::from_utf8_lossy(b).into_owned()),
            (5, Wire::Bytes(summary)) => {
                let mut values = Fields(summary);
                while let Some((1, Wire::Bytes(value))) = values.next()? {
                    let (mut tag, mut simple) = (String::new(), None);
                    let mut v = Fields(value);
                    while let Some((field, wire)) = v.next()? {
                        match (field, wire) {
                            (1, Wire::Bytes(b)) => tag = String::from_utf8_lossy(b).into_owned(),
                            (2, Wire::Fixed32(b)) => simple = Some(f32::from_le_bytes(b)),
                            _ => {}
                        }
                    }
                    e.scalars.push((tag, simple.ok_or("a summary value without simple_value")?));
                }
            }
            (6, Wire::Bytes(log)) => {
                if let Some((1, Wire::Varint(status))) = Fields(log).next()? {
                    e.session_status = Some(status);
                }
            }
            _ => {}
        }
    }
    Ok(e)
}

/// Reads every event of a file, checking the framing and both CRCs of each record.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut rest = bytes.as_slice();
    let mut events = Vec::new();
    while !rest.is_empty() {
        let bad = |msg: String| Error::config(path, &format!("record {}", events.len() + 1), msg);
        if rest.len() < 12 {
            return Err(bad("truncated length header".into()));
        }
        let (len, crc) = (&rest[..8], u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes")));
        if masked_crc(len) != crc {
            return Err(bad("length CRC mismatch".into()));
        }
        let n = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        let Some(data) = rest.get(12..12 + n) else { return Err(bad("truncated data".into())) };
        let Some(crc) = rest.get(12 + n..16 + n) else { return Err(bad("truncated data CRC".into())) };
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad("data CRC mismatch".into()));
        }
        events.push(decode_event(data).map_err(bad)?);
        rest = &rest[16 + n..];
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        // RFC 3720 B.4 and the CRC catalogue's check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
    }

    #[test]
    fn written_events_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 4).unwrap();
        w.scalars(5, &[("train/loss", 2.5), ("train/learning_rate", 1e-4)]).unwrap();
        w.scalars(6, &[("eval/loss", 1.25)]).unwrap();
        let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        let events = read_events(w.path()).unwrap();
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!((events[1].step, events[1].session_status), (5, Some(1)));
        assert_eq!(events[2].step, 5);
        assert_eq!(events[2].scalars, vec![("train/loss".into(), 2.5), ("train/learning_rate".into(), 1e-4f32)]);
        assert_eq!((events[3].step, events[3].scalars[0].1), (6, 1.25));
        assert!(events[3].wall_time > 1.5e9);

        // A flipped byte anywhere is caught by a CRC.
        let mut bytes = std::fs::read(w.path()).unwrap();
        let last = bytes.len() - 6;
        bytes[last] ^= 1;
        std::fs::write(w.path(), &bytes).unwrap();
        let e = read_events(w.path()).unwrap_err().to_string();
        assert!(e.contains("record 4: data CRC mismatch"), "{e}");
    }
}
