//! Writing a GGUF v3 file, laid out as gguf-py's `GGUFWriter` lays it out: magic, version, tensor count,
//! key/value count, the key/values, the tensor infos (offsets relative to the data section, each tensor's size
//! padded to the alignment), zero padding to the alignment, then each tensor's bytes followed by padding.
//! The tensor bytes are asked for one at a time, so memory holds one tensor; the file is written beside its
//! target and renamed into place (`fsutil::write_atomic_with`), so a failure never leaves a partial file.

use super::dequant::GgmlType;
use super::metadata::{MetaArray, MetaValue};
use crate::error::{Error, Result};
use crate::formats::fsutil::write_atomic_with;
use std::io::{BufWriter, Write};
use std::path::Path;

/// What every GGUF file this writer produces uses (and records as `general.alignment`).
pub const ALIGNMENT: usize = 32;

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorEntry {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, the columns of a matrix.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
}

impl TensorEntry {
    pub fn n_bytes(&self) -> usize {
        self.dims.iter().product::<usize>() / self.ty.block_size() * self.ty.type_size()
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_id(v: &MetaValue) -> u32 {
    match v {
        MetaValue::U8(_) => 0,
        MetaValue::I8(_) => 1,
        MetaValue::U16(_) => 2,
        MetaValue::I16(_) => 3,
        MetaValue::U32(_) => 4,
        MetaValue::I32(_) => 5,
        MetaValue::F32(_) => 6,
        MetaValue::Bool(_) => 7,
        MetaValue::Str(_) => 8,
        MetaValue::Array(_) => 9,
        MetaValue::U64(_) => 10,
        MetaValue::I64(_) => 11,
        MetaValue::F64(_) => 12,
    }
}

fn put_array(out: &mut Vec<u8>, a: &MetaArray) {
    macro_rules! fixed {
        ($id:expr, $v:expr) => {{
            out.extend(($id as u32).to_le_bytes());
            out.extend(($v.len() as u64).to_le_bytes());
            for x in $v {
                out.extend(x.to_le_bytes());
            }
        }};
    }
    match a {
        MetaArray::U8(v) => fixed!(0, v),
        MetaArray::I8(v) => fixed!(1, v),
        MetaArray::U16(v) => fixed!(2, v),
        MetaArray::I16(v) => fixed!(3, v),
        MetaArray::U32(v) => fixed!(4, v),
        MetaArray::I32(v) => fixed!(5, v),
        MetaArray::F32(v) => fixed!(6, v),
        MetaArray::Bool(v) => fixed!(7, v.iter().map(|&b| b as u8).collect::<Vec<u8>>()),
        MetaArray::Str(v) => {
            out.extend(8u32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            for s in v {
                put_str(out, s);
            }
        }
        MetaArray::Array(v) => {
            out.extend(9u32.to_le_bytes());
            out.extend((v.len() as u64).to_le_bytes());
            for inner in v {
                put_array(out, inner);
            }
        }
        MetaArray::U64(v) => fixed!(10, v),
        MetaArray::I64(v) => fixed!(11, v),
        MetaArray::F64(v) => fixed!(12, v),
    }
}

fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
    out.extend(type_id(v).to_le_bytes());
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.extend(x.to_le_bytes()),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(x) => out.push(*x as u8),
        MetaValue::Str(s) => put_str(out, s),
        MetaValue::Array(a) => put_array(out, a),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// Everything before the data section: header, key/values, tensor infos, padding.
pub fn header_bytes(metadata: &[(String, MetaValue)], tensors: &[TensorEntry]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut out, key);
        put_value(&mut out, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend((*d as u64).to_le_bytes());
        }
        out.extend((t.ty as u32).to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += t.n_bytes().next_multiple_of(ALIGNMENT);
    }
    out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
    out
}

/// Writes the GGUF file `path` atomically; `data(i)` returns the bytes of `tensors[i]`, which must be exactly
/// its [`TensorEntry::n_bytes`]. Returns the file size.
pub fn write(
    path: &Path,
    metadata: &[(String, MetaValue)],
    tensors: &[TensorEntry],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let header = header_bytes(metadata, tensors);
    let mut failure: Option<Error> = None;
    let mut size = header.len() as u64;
    let written = write_atomic_with(path, |f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&header)?;
        for (i, t) in tensors.iter().enumerate() {
            let bytes = match data(i) {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(e);
                    return Err(std::io::Error::other("stopped: a tensor could not be produced"));
                }
            };
            if bytes.len() != t.n_bytes() {
                failure = Some(Error::Tensor {
                    path: path.into(),
                    tensor: t.name.clone(),
                    msg: format!("{} bytes produced for a {}-byte {} tensor", bytes.len(), t.n_bytes(), t.ty.name()),
                });
                return Err(std::io::Error::other("stopped: a tensor has the wrong size"));
            }
            let padded = bytes.len().next_multiple_of(ALIGNMENT);
            w.write_all(&bytes)?;
            w.write_all(&vec![0u8; padded - bytes.len()])?;
            size += padded as u64;
        }
        w.flush()
    });
    match (failure, written) {
        (Some(e), _) => Err(e),
        (None, r) => r.map(|()| size),
    }
}

#[cfg(test)]
mod tests {
    use super::super::reader::GgufFile;
    use super::*;

    #[test]
    fn written_files_read_back_with_every_value_type() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let metadata: Vec<(String, MetaValue)> = vec![
            ("general.architecture".into(), MetaValue::Str("llama".into())),
            ("general.alignment".into(), MetaValue::U32(32)),
            ("a.u8".into(), MetaValue::U8(7)),
            ("a.i8".into(), MetaValue::I8(-7)),
            ("a.u16".into(), MetaValue::U16(700)),
            ("a.i16".into(), MetaValue::I16(-700)),
            ("a.i32".into(), MetaValue::I32(-70000)),
            ("a.f32".into(), MetaValue::F32(1e-5)),
            ("a.bool".into(), MetaValue::Bool(true)),
            ("a.u64".into(), MetaValue::U64(1 << 40)),
            ("a.i64".into(), MetaValue::I64(-(1 << 40))),
            ("a.f64".into(), MetaValue::F64(0.1)),
            ("a.strs".into(), MetaValue::Array(MetaArray::Str(vec!["x y".into(), "▁z".into()]))),
            ("a.bools".into(), MetaValue::Array(MetaArray::Bool(vec![true, false]))),
            (
                "a.nested".into(),
                MetaValue::Array(MetaArray::Array(vec![MetaArray::I32(vec![1, -2]), MetaArray::F32(vec![0.5])])),
            ),
        ];
        let tensors = vec![
            TensorEntry { name: "a".into(), dims: vec![3], ty: GgmlType::F32 },
            TensorEntry { name: "b".into(), dims: vec![32, 2], ty: GgmlType::Q8_0 },
        ];
        let blobs = [vec![1u8; 12], vec![2u8; 68]];
        let size = write(&path, &metadata, &tensors, |i| Ok(blobs[i].clone())).unwrap();
        assert_eq!(size, std::fs::metadata(&path).unwrap().len());
        let file = GgufFile::open(&path).unwrap();
        assert_eq!(file.version(), 3);
        for (k, v) in &metadata {
            assert_eq!(&file.metadata()[k], v, "{k}");
        }
        let b = file.tensor("b").unwrap();
        assert_eq!((b.dims.clone(), b.ty, b.offset), (vec![32, 2], GgmlType::Q8_0, 32));
        assert_eq!(file.tensor_bytes(b), &blobs[1][..]);
        assert_eq!(file.tensor_bytes(file.tensor("a").unwrap()), &blobs[0][..]);
    }

    #[test]
    fn a_failing_tensor_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.gguf");
        let tensors = vec![TensorEntry { name: "a".into(), dims: vec![4], ty: GgmlType::F32 }];
        let e = write(&path, &[], &tensors, |_| Err(Error::config("x", "k", "no such weight"))).unwrap_err();
        assert!(e.to_string().contains("no such weight"), "{e}");
        let e = write(&path, &[], &tensors, |_| Ok(vec![0; 3])).unwrap_err();
        assert!(e.to_string().contains("3 bytes produced for a 16-byte F32 tensor"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
