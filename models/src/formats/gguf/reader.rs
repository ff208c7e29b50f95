//! The GGUF container (versions 2 and 3, little-endian): header, metadata key/values, tensor infos, and the
//! aligned data section, read through a memory map. Layout as llama.cpp's `gguf-py/gguf/gguf_reader.py` reads
//! it: magic `GGUF`, u32 version, u64 tensor count, u64 key/value count, the key/values, the tensor infos,
//! padding to `general.alignment` (32 by default), then the tensor data at offsets relative to that point.
//!
//! Every count, length, offset and size comes from the file, so each is checked against the bytes that remain
//! before anything is allocated or sliced: a truncated or corrupt file is an error naming the file and the
//! field, never a panic and never an allocation larger than the file justifies.

use super::dequant::GgmlType;
use super::metadata::{MetaArray, MetaValue};
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"GGUF";
/// `GGUF_DEFAULT_ALIGNMENT` in gguf-py's constants.py.
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Real files nest arrays one level deep at most; the limit keeps a crafted file from recursing the stack away.
const MAX_ARRAY_DEPTH: usize = 8;

/// Where one tensor lives and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, the columns of a matrix.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: usize,
    pub n_elements: usize,
    pub n_bytes: usize,
}

impl TensorInfo {
    /// The shape outermost first, as PyTorch and safetensors write it: `[rows, columns]` for a matrix.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// The parsed header of a GGUF file: everything but the tensor bytes.
#[derive(Debug)]
pub struct Layout {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: usize,
    /// Absolute offset of the data section.
    pub data_start: usize,
}

/// An opened GGUF file: its layout and a read-only map of its bytes.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    layout: Layout,
    index: HashMap<String, usize>,
}

/// A bounds-checked reader over the file's bytes; every error names the file and what was being read.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn err(&self, msg: impl Into<String>) -> Error {
        Error::Checkpoint { path: self.path.into(), msg: format!("invalid GGUF: {}", msg.into()) }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(format!(
                "truncated: {} needs {n} bytes at offset {}, but the file ends at {}",
                what(),
                self.pos,
                self.buf.len()
            )));
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let b = self.take(N, what)?;
        // take returned exactly N bytes.
        Ok(b.try_into().expect("slice of length N"))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length from the file, refused when `count × min_size` bytes cannot follow, so that no
    /// allocation sized by it exceeds what the file could hold.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let fits = usize::try_from(n).ok().filter(|&n| n.checked_mul(min_size).is_some_and(|b| b <= self.remaining()));
        fits.ok_or_else(|| {
            self.err(format!(
                "{} is {n}, but only {} bytes follow (at least {min_size} per item)",
                what(),
                self.remaining()
            ))
        })
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(1, &|| format!("length of {}", what()))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| self.err(format!("{} is not valid UTF-8: {e}", what())))
    }
}

/// Smallest encoding of one value of a GGUF type: bounds array lengths before allocating.
fn min_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        // An inner array: its u32 type and u64 length.
        _ => 12,
    }
}

fn read_array(c: &mut Cursor, what: &dyn Fn() -> String, depth: usize) -> Result<MetaArray> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(c.err(format!("{} nests arrays more than {MAX_ARRAY_DEPTH} deep", what())));
    }
    let ty = c.u32(&|| format!("element type of {}", what()))?;
    if ty > 12 {
        return Err(c.err(format!("{} has unknown element type {ty}", what())));
    }
    let n = c.count(min_size(ty), &|| format!("length of {}", what()))?;
    let item = |i: usize| format!("{}[{i}]", what());
    macro_rules! fixed {
        ($variant:ident, $t:ty) => {{
            let bytes = c.take(n * std::mem::size_of::<$t>(), what)?;
            MetaArray::$variant(
                bytes
                    .chunks_exact(std::mem::size_of::<$t>())
                    .map(|b| <$t>::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            )
        }};
    }
    Ok(match ty {
        0 => fixed!(U8, u8),
        1 => fixed!(I8, i8),
        2 => fixed!(U16, u16),
        3 => fixed!(I16, i16),
        4 => fixed!(U32, u32),
        5 => fixed!(I32, i32),
        6 => fixed!(F32, f32),
        7 => MetaArray::Bool(c.take(n, what)?.iter().map(|&b| b != 0).collect()),
        8 => MetaArray::Str((0..n).map(|i| c.string(&|| item(i))).collect::<Result<_>>()?),
        9 => MetaArray::Array((0..n).map(|i| read_array(c, &|| item(i), depth + 1)).collect::<Result<_>>()?),
        10 => fixed!(U64, u64),
        11 => fixed!(I64, i64),
        _ => fixed!(F64, f64),
    })
}

fn read_value(c: &mut Cursor, ty: u32, what: &dyn Fn() -> String) -> Result<MetaValue> {
    Ok(match ty {
        0 => MetaValue::U8(c.array::<1>(what)?[0]),
        1 => MetaValue::I8(i8::from_le_bytes(c.array(what)?)),
        2 => MetaValue::U16(u16::from_le_bytes(c.array(what)?)),
        3 => MetaValue::I16(i16::from_le_bytes(c.array(what)?)),
        4 => MetaValue::U32(c.u32(what)?),
        5 => MetaValue::I32(i32::from_le_bytes(c.array(what)?)),
        6 => MetaValue::F32(f32::from_le_bytes(c.array(what)?)),
        7 => MetaValue::Bool(c.array::<1>(what)?[0] != 0),
        8 => MetaValue::Str(c.string(what)?),
        9 => MetaValue::Array(read_array(c, what, 0)?),
        10 => MetaValue::U64(c.u64(what)?),
        11 => MetaValue::I64(i64::from_le_bytes(c.array(what)?)),
        12 => MetaValue::F64(f64::from_le_bytes(c.array(what)?)),
        other => return Err(c.err(format!("{} has unknown value type {other}", what()))),
    })
}

fn read_tensor_info(c: &mut Cursor, i: usize) -> Result<TensorInfo> {
    let name = c.string(&|| format!("name of tensor #{i}"))?;
    let what = |field: &str| format!("{field} of tensor {name}");
    let n_dims = c.u32(&|| what("dimension count"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(c.err(format!("tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for d in 0..n_dims {
        let v = c.u64(&|| what(&format!("dimension {d}")))?;
        dims.push(usize::try_from(v).map_err(|_| c.err(format!("tensor {name}: dimension {d} = {v} is too large")))?);
    }
    let type_id = c.u32(&|| what("type"))?;
    let ty =
        GgmlType::from_id(type_id).ok_or_else(|| c.err(format!("tensor {name} has unknown ggml type id {type_id}")))?;
    let offset = c.u64(&|| what("data offset"))?;
    let offset =
        usize::try_from(offset).map_err(|_| c.err(format!("tensor {name}: data offset {offset} is too large")))?;
    let n_elements = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| c.err(format!("tensor {name}: element count of {dims:?} overflows")))?;
    let (block, type_size) = (ty.block_size(), ty.type_size());
    if dims[0] % block != 0 {
        return Err(c.err(format!(
            "tensor {name}: {} rows of {} values are not whole {}-value blocks of {}",
            n_elements / dims[0].max(1),
            dims[0],
            block,
            ty.name()
        )));
    }
    let n_bytes = (n_elements / block)
        .checked_mul(type_size)
        .ok_or_else(|| c.err(format!("tensor {name}: byte size overflows")))?;
    Ok(TensorInfo { name, dims, ty, offset, n_elements, n_bytes })
}

/// Parses the header of a GGUF file held in `buf`; `path` names the file in errors.
pub fn parse(path: &Path, buf: &[u8]) -> Result<Layout> {
    let c = &mut Cursor { path, buf, pos: 0 };
    let magic = c.array::<4>(&|| "the magic number".into())?;
    if &magic != MAGIC {
        return Err(c.err(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
    }
    let version = c.u32(&|| "the version".into())?;
    match version {
        2 | 3 => {}
        1 => return Err(c.err("GGUF version 1 is not supported (2 and 3 are); re-convert it with current llama.cpp")),
        v if matches!(v.swap_bytes(), 2 | 3) => {
            return Err(c.err("big-endian GGUF files are not supported (little-endian versions 2 and 3 are)"))
        }
        v => return Err(c.err(format!("GGUF version {v} is not supported (2 and 3 are)"))),
    }
    // A tensor info is at least a u64 name length, u32 dimension count, one u64 dimension, u32 type, u64 offset.
    let n_tensors = c.u64(&|| "the tensor count".into())?;
    // A key/value is at least a u64 key length, u32 type and one byte of value.
    let n_kv = c.count(13, &|| "the metadata key/value count".into())?;
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry #{i}"))?;
        let what = || format!("metadata {key}");
        let ty = c.u32(&|| format!("type of {}", what()))?;
        let value = read_value(c, ty, &what)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.err(format!("metadata key {key} appears twice")));
        }
    }
    let n_tensors = usize::try_from(n_tensors)
        .ok()
        .filter(|&n| n.checked_mul(32).is_some_and(|b| b <= c.remaining()))
        .ok_or_else(|| {
            c.err(format!("the tensor count is {n_tensors}, but only {} bytes of tensor infos follow", c.remaining()))
        })?;
    let mut tensors = Vec::with_capacity(n_tensors);
    for i in 0..n_tensors {
        tensors.push(read_tensor_info(c, i)?);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| Error::config(path, "general.alignment", format!("must be a power of two, got {v:?}")))?,
    };
    let alignment = usize::try_from(alignment)
        .map_err(|_| Error::config(path, "general.alignment", format!("{alignment} is too large")))?;
    let data_start = c
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| c.err(format!("data section start overflows at alignment {alignment}")))?;
    let mut names = HashSet::with_capacity(tensors.len());
    for t in &tensors {
        if !names.insert(t.name.as_str()) {
            return Err(c.err(format!("tensor {} appears twice", t.name)));
        }
        if t.offset % alignment != 0 {
            return Err(c.err(format!("tensor {}: data offset {} is not a multiple of {alignment}", t.name, t.offset)));
        }
        let end = data_start.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
        if end.is_none_or(|e| e > buf.len()) {
            return Err(c.err(format!(
                "truncated: tensor {} ({} bytes at data offset {}) extends past the end of the file ({} bytes)",
                t.name,
                t.n_bytes,
                t.offset,
                buf.len()
            )));
        }
    }
    Ok(Layout { version, metadata, tensors, alignment, data_start })
}

impl GgufFile {
    /// Maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; a concurrent writer truncating the file could
        // fault reads, the documented risk of every memory-mapped loader and acceptable for model files.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let layout = parse(path, &map)?;
        let index = layout.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(GgufFile { path: path.into(), map, layout, index })
    }

    pub fn version(&self) -> u32 {
        self.layout.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.layout.metadata
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.layout.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.layout.tensors[i])
    }

    /// The stored bytes of a tensor (borrowed from the map; `parse` checked the extent).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = self.layout.data_start + t.offset;
        &self.map[start..start + t.n_bytes]
    }

    /// An error about metadata `key`.
    pub fn key_error(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.path, key, msg)
    }

    /// An error about tensor `name`.
    pub fn tensor_error(&self, name: &str, msg: impl Into<String>) -> Error {
        Error::Tensor { path: self.path.clone(), tensor: name.into(), msg: msg.into() }
    }

    fn typed<'s, T>(
        &'s self,
        key: &str,
        expected: &str,
        get: impl Fn(&'s MetaValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.layout.metadata.get(key) {
            None => Ok(None),
            Some(v) => get(v)
                .map(Some)
                .ok_or_else(|| self.key_error(key, format!("expected {expected}, got a {}", v.type_name()))),
        }
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        self.typed(key, "a non-negative integer", MetaValue::as_u64)
    }

    /// An integer that must be present and fit a usize.
    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get_u64(key)?.ok_or_else(|| self.key_error(key, "missing"))?;
        usize::try_from(v).map_err(|_| self.key_error(key, format!("{v} is too large")))
    }

    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a number", MetaValue::as_f64)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", |v| match v {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        })
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", |v| match v {
            MetaValue::Str(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&MetaArray>> {
        self.typed(key, "an array", |v| match v {
            MetaValue::Array(a) => Some(a),
            _ => None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds GGUF bytes by hand, so the tests depend on no other writer.
    #[derive(Default)]
    pub(crate) struct Builder {
        pub kv: Vec<u8>,
        pub n_kv: u64,
        pub infos: Vec<u8>,
        pub n_tensors: u64,
        pub data: Vec<u8>,
    }

    pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    impl Builder {
        pub fn kv(&mut self, key: &str, ty: u32, value: &[u8]) -> &mut Self {
            put_str(&mut self.kv, key);
            self.kv.extend(ty.to_le_bytes());
            self.kv.extend(value);
            self.n_kv += 1;
            self
        }

        pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.kv(key, 4, &v.to_le_bytes())
        }

        pub fn kv_f32(&mut self, key: &str, v: f32) -> &mut Self {
            self.kv(key, 6, &v.to_le_bytes())
        }

        pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
            let mut b = Vec::new();
            put_str(&mut b, v);
            self.kv(key, 8, &b)
        }

        pub fn kv_strs(&mut self, key: &str, vs: &[&str]) -> &mut Self {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend((vs.len() as u64).to_le_bytes());
            for v in vs {
                put_str(&mut b, v);
            }
            self.kv(key, 9, &b)
        }

        /// A tensor of raw `bytes` with ggml dims (innermost first), placed at the next 32-byte boundary.
        pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, bytes: &[u8]) -> &mut Self {
            let offset = self.data.len().next_multiple_of(32);
            self.data.resize(offset, 0);
            self.data.extend(bytes);
            put_str(&mut self.infos, name);
            self.infos.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.infos.extend(d.to_le_bytes());
            }
            self.infos.extend(ty.to_le_bytes());
            self.infos.extend((offset as u64).to_le_bytes());
            self.n_tensors += 1;
            self
        }

        pub fn bytes(&self, version: u32) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(version.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend(&self.kv);
            out.extend(&self.infos);
            out.resize(out.len().next_multiple_of(32), 0);
            out.extend(&self.data);
            out
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn sample() -> Builder {
        let mut b = Builder::default();
        b.kv_str("general.architecture", "llama").kv_u32("llama.block_count", 2).kv_f32("llama.rope.freq_base", 1e4);
        // A nested array: [[1, 2], ["a"]].
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend(2u64.to_le_bytes());
        nested.extend(4u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        nested.extend(1u32.to_le_bytes());
        nested.extend(2u32.to_le_bytes());
        nested.extend(8u32.to_le_bytes());
        nested.extend(1u64.to_le_bytes());
        put_str(&mut nested, "a");
        b.kv("test.nested", 9, &nested);
        b.kv("test.flag", 7, &[1]).kv("test.i8", 1, &[0xff]).kv("test.f64", 12, &2.5f64.to_le_bytes());
        b.tensor("a.weight", &[3, 2], 0, &f32_bytes(&[1., 2., 3., 4., 5., 6.]));
        b.tensor("b.weight", &[4], 0, &f32_bytes(&[7., 8., 9., 10.]));
        b
    }

    fn err(buf: &[u8]) -> String {
        parse(Path::new("m.gguf"), buf).unwrap_err().to_string()
    }

    #[test]
    fn parses_header_metadata_and_tensors_of_v2_and_v3() {
        for version in [2, 3] {
            let buf = sample().bytes(version);
            let l = parse(Path::new("m.gguf"), &buf).unwrap();
            assert_eq!(l.version, version);
            assert_eq!(l.metadata["general.architecture"], MetaValue::Str("llama".into()));
            assert_eq!(l.metadata["llama.block_count"].as_u64(), Some(2));
            assert_eq!(l.metadata["llama.rope.freq_base"].as_f64(), Some(1e4));
            assert_eq!(l.metadata["test.flag"], MetaValue::Bool(true));
            assert_eq!(l.metadata["test.i8"], MetaValue::I8(-1));
            assert_eq!(l.metadata["test.i8"].as_u64(), None);
            assert_eq!(l.metadata["test.f64"].as_f64(), Some(2.5));
            assert_eq!(
                l.metadata["test.nested"],
                MetaValue::Array(MetaArray::Array(vec![MetaArray::U32(vec![1, 2]), MetaArray::Str(vec!["a".into()])]))
            );
            assert_eq!(l.tensors.len(), 2);
            let a = &l.tensors[0];
            assert_eq!(
                (a.name.as_str(), a.dims.clone(), a.shape(), a.n_bytes),
                ("a.weight", vec![3, 2], vec![2, 3], 24)
            );
            assert_eq!(l.data_start % 32, 0);
            assert_eq!(l.tensors[1].offset, 32);
            let start = l.data_start + l.tensors[1].offset;
            assert_eq!(&buf[start..start + 4], &7f32.to_le_bytes());
        }
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let buf = sample().bytes(3);
        // The last tensor ends where the file ends, so every shorter prefix lacks something.
        let needed = buf.len();
        for cut in 0..needed {
            let r = parse(Path::new("m.gguf"), &buf[..cut]);
            match r {
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.starts_with("m.gguf: invalid GGUF: "), "cut {cut}: {e}");
                }
                Ok(_) => panic!("cut at {cut} of {needed} bytes parsed"),
            }
        }
    }

    #[test]
    fn bogus_counts_offsets_and_types_are_refused() {
        let set = |buf: &mut Vec<u8>, at: usize, bytes: &[u8]| buf[at..at + bytes.len()].copy_from_slice(bytes);
        let good = sample().bytes(3);

        let mut b = good.clone();
        set(&mut b, 0, b"GGML");
        assert!(err(&b).contains("not a GGUF file"));
        let mut b = good.clone();
        set(&mut b, 4, &3u32.to_be_bytes());
        assert!(err(&b).contains("big-endian"));
        let mut b = good.clone();
        set(&mut b, 4, &1u32.to_le_bytes());
        assert!(err(&b).contains("version 1"));
        // Counts far beyond the file: refused before any allocation.
        let mut b = good.clone();
        set(&mut b, 8, &u64::MAX.to_le_bytes());
        assert!(err(&b).contains("tensor count"), "{}", err(&b));
        let mut b = good.clone();
        set(&mut b, 16, &(1u64 << 40).to_le_bytes());
        assert!(err(&b).contains("key/value count"), "{}", err(&b));
        // The first key's length.
        let mut b = good.clone();
        set(&mut b, 24, &(u64::MAX - 3).to_le_bytes());
        assert!(err(&b).contains("length of key of metadata entry #0"), "{}", err(&b));

        // A string array claiming more elements than bytes remain.
        let mut bad = Builder::default();
        let mut arr = 8u32.to_le_bytes().to_vec();
        arr.extend((1u64 << 50).to_le_bytes());
        bad.kv("tokenizer.ggml.tokens", 9, &arr);
        assert!(err(&bad.bytes(3)).contains("length of metadata tokenizer.ggml.tokens"));
        // Unknown value and element types.
        let mut bad = Builder::default();
        bad.kv("x", 13, &[0; 8]);
        assert!(err(&bad.bytes(3)).contains("metadata x has unknown value type 13"));
        // Arrays nested past the limit.
        let mut deep = Vec::new();
        for _ in 0..20 {
            deep.extend(9u32.to_le_bytes());
            deep.extend(1u64.to_le_bytes());
        }
        let mut bad = Builder::default();
        bad.kv("deep", 9, &deep);
        assert!(err(&bad.bytes(3)).contains("nests arrays"));
        // Duplicate keys and tensors.
        let mut bad = Builder::default();
        bad.kv_u32("k", 1).kv_u32("k", 2);
        assert!(err(&bad.bytes(3)).contains("metadata key k appears twice"));
        let mut bad = Builder::default();
        bad.tensor("t", &[1], 0, &[0; 4]).tensor("t", &[1], 0, &[0; 4]);
        assert!(err(&bad.bytes(3)).contains("tensor t appears twice"));

        // Tensor infos: bad type, too many dims, overflowing dims, misaligned or out-of-file offsets, partial blocks.
        let tensor = |dims: &[u64], ty: u32, bytes: &[u8]| {
            let mut b = Builder::default();
            b.tensor("w", dims, ty, bytes);
            b
        };
        assert!(err(&tensor(&[4], 99, &[0; 16]).bytes(3)).contains("unknown ggml type id 99"));
        assert!(err(&tensor(&[1, 1, 1, 1, 1], 0, &[0; 4]).bytes(3)).contains("5 dimensions"));
        assert!(err(&tensor(&[1 << 40, 1 << 40], 0, &[]).bytes(3)).contains("overflows"));
        assert!(err(&tensor(&[16], 8, &[0; 34]).bytes(3)).contains("not whole 32-value blocks of Q8_0"));
        assert!(err(&tensor(&[64], 0, &[0; 16]).bytes(3)).contains("extends past the end"));
        let mut b = tensor(&[4], 0, &[0; 16]);
        let off_at = b.infos.len() - 8;
        b.infos[off_at..].copy_from_slice(&4u64.to_le_bytes());
        assert!(err(&b.bytes(3)).contains("not a multiple of 32"));
        b.infos[off_at..].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
        assert!(err(&b.bytes(3)).contains("extends past the end"), "{}", err(&b.bytes(3)));
        // Alignment must be a power of two.
        let mut b = sample();
        b.kv_u32("general.alignment", 24);
        assert!(err(&b.bytes(3)).contains("general.alignment: must be a power of two"));
    }

    #[test]
    fn alignment_from_metadata_moves_the_data_section() {
        let mut b = Builder::default();
        b.kv_u32("general.alignment", 64).tensor("t", &[1], 0, &[0; 4]);
        let mut buf = b.bytes(3);
        // The builder pads to 32; a 64-aligned reader expects the data at the next multiple of 64.
        let l = parse(Path::new("m.gguf"), &[buf.clone(), vec![0; 64]].concat()).unwrap();
        assert_eq!((l.alignment, l.data_start % 64), (64, 0));
        buf.truncate(l.data_start.min(buf.len()));
        assert!(err(&buf).contains("extends past the end"));
    }
}
