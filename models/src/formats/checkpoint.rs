//! Hugging Face safetensors checkpoints, single file or sharded (`model.safetensors.index.json`), read through
//! memory maps: a tensor is copied out only when asked for, so loading layer by layer keeps host memory near
//! one layer. Pickle files (`*.bin`, `*.pt`, `*.pth`) are refused: loading them can run arbitrary code.

use crate::error::{Error, Result};
use memmap2::Mmap;
use qlora_runtime::{CpuStorage, DType, Tensor};
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Start of the data section (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// The tensors of a model folder, by name.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name → shard index.
    index: HashMap<String, usize>,
}

fn open_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and private to this process; a concurrent writer truncating the file could
    // fault reads, which is the documented risk of every memory-mapped loader (safetensors, candle) and
    // acceptable for checkpoint files.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|e| Error::Checkpoint { path: path.into(), msg: format!("not a valid safetensors file: {e}") })?;
    Ok(Shard { path: path.into(), data_start: 8 + header_len, map, metadata })
}

fn dtype_of(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::F64 => DType::F64,
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::I32 => DType::I32,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`, or else every
    /// `*.safetensors` file in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::json(&index_path, &e))?;
            let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
                return Err(Error::config(&index_path, "weight_map", "missing or not an object"));
            };
            let mut names: Vec<&str> = Vec::new();
            for (tensor, file) in map {
                let Some(file) = file.as_str() else {
                    return Err(Error::config(&index_path, &format!("weight_map.{tensor}"), "expected a file name"));
                };
                if file.contains('/') || file.contains('\\') || file == ".." {
                    return Err(Error::config(
                        &index_path,
                        &format!("weight_map.{tensor}"),
                        "file must be in the same folder",
                    ));
                }
                if !names.contains(&file) {
                    names.push(file);
                }
            }
            names.sort_unstable();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            let mut found: Vec<PathBuf> = Vec::new();
            let mut pickles: Vec<PathBuf> = Vec::new();
            for entry in entries {
                let path = entry.map_err(|e| Error::io(dir, e))?.path();
                match path.extension().and_then(|e| e.to_str()) {
                    Some("safetensors") => found.push(path),
                    Some("bin" | "pt" | "pth" | "ckpt") => pickles.push(path),
                    _ => {}
                }
            }
            if found.is_empty() {
                let msg = match pickles.first() {
                    Some(p) => format!(
                        "only PyTorch pickle weights found ({}); pickle can run arbitrary code and is never loaded — \
                         convert them to safetensors first",
                        p.display()
                    ),
                    None => "no *.safetensors weights found".into(),
                };
                return Err(Error::Checkpoint { path: dir.into(), msg });
            }
            found.sort();
            found
        };
        Self::from_files(&files)
    }

    /// Opens exactly these safetensors files as one checkpoint.
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let shard = open_shard(path)?;
            for name in shard.metadata.tensors().keys() {
                if index.insert(name.clone(), i).is_some() {
                    return Err(Error::Tensor {
                        path: path.clone(),
                        tensor: name.clone(),
                        msg: "appears in two shards".into(),
                    });
                }
            }
            shards.push(shard);
        }
        Ok(Checkpoint { shards, index })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// An error about tensor `name`, naming the file that holds it (or the first shard when it is missing).
    pub fn tensor_error(&self, name: &str, msg: impl Into<String>) -> Error {
        let shard = self.index.get(name).map_or(0, |&i| i);
        let path = self.shards.get(shard).map(|s| s.path.clone()).unwrap_or_default();
        Error::Tensor { path, tensor: name.into(), msg: msg.into() }
    }

    fn locate(&self, name: &str) -> Result<(&Shard, &safetensors::tensor::TensorInfo)> {
        let Some(&i) = self.index.get(name) else {
            return Err(self.tensor_error(name, "missing from the checkpoint"));
        };
        let shard = &self.shards[i];
        let info = shard.metadata.info(name).expect("indexed from this shard's metadata");
        Ok((shard, info))
    }

    /// (dtype name as stored, shape) of a tensor.
    pub fn info(&self, name: &str) -> Result<(String, Vec<usize>)> {
        let (_, info) = self.locate(name)?;
        Ok((format!("{:?}", info.dtype), info.shape.clone()))
    }

    /// The raw little-endian bytes of a tensor (borrowed from the map).
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let (shard, info) = self.locate(name)?;
        let (a, b) = info.data_offsets;
        // read_metadata validated the offsets against the buffer length.
        Ok(&shard.map[shard.data_start + a..shard.data_start + b])
    }

    /// Copies a tensor out in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let (shard, info) = self.locate(name)?;
        let err = |msg: String| Error::Tensor { path: shard.path.clone(), tensor: name.into(), msg };
        let dtype = dtype_of(info.dtype).ok_or_else(|| err(format!("dtype {:?} is not supported", info.dtype)))?;
        let bytes = self.bytes(name)?;
        let storage = match dtype {
            DType::F64 => CpuStorage::F64(bytemuck::pod_collect_to_vec(bytes)),
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::I32 => CpuStorage::I32(bytemuck::pod_collect_to_vec(bytes)),
            DType::U8 => CpuStorage::U8(bytes.to_vec()),
        };
        Tensor::from_cpu_storage(storage, &info.shape).map_err(|e| err(e.to_string()))
    }

    /// [`Checkpoint::load`] that also checks the shape, naming the tensor when it differs.
    pub fn load_shaped(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.load(name)?;
        if t.shape() != shape {
            return Err(self.tensor_error(name, format!("shape {:?}, expected {shape:?} from config.json", t.shape())));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::{serialize_to_file, TensorView};

    fn write(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, v, s)| (n.to_string(), TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(v)).unwrap()))
            .collect();
        serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn single_and_sharded_checkpoints_load() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("model.safetensors"),
            &[("a", vec![1.0, 2.0], vec![2]), ("b", vec![3.0; 6], vec![2, 3])],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.names(), vec!["a", "b"]);
        assert_eq!(ck.load("a").unwrap().to_vec::<f32>(), vec![1.0, 2.0]);
        assert_eq!(ck.load_shaped("b", &[2, 3]).unwrap().shape(), &[2, 3]);
        let e = ck.load_shaped("b", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("tensor b") && e.contains("[2, 3]"), "{e}");
        assert!(ck.load("c").unwrap_err().to_string().contains("tensor c: missing"));

        let sharded = tempfile::tempdir().unwrap();
        write(&sharded.path().join("model-00001-of-00002.safetensors"), &[("x", vec![1.0], vec![1])]);
        write(&sharded.path().join("model-00002-of-00002.safetensors"), &[("y", vec![2.0], vec![1])]);
        std::fs::write(
            sharded.path().join("model.safetensors.index.json"),
            r#"{"metadata":{"total_size":8},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(sharded.path()).unwrap();
        assert_eq!(ck.load("y").unwrap().to_vec::<f32>(), vec![2.0]);
    }

    #[test]
    fn pickles_corrupt_files_and_escaping_shards_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"not loaded").unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("pickle") && e.contains("pytorch_model.bin"), "{e}");

        std::fs::write(dir.path().join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        let e = Checkpoint::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors file"), "{e}");

        let evil = tempfile::tempdir().unwrap();
        std::fs::write(
            evil.path().join("model.safetensors.index.json"),
            r#"{"weight_map":{"x":"../secret.safetensors"}}"#,
        )
        .unwrap();
        let e = Checkpoint::open(evil.path()).err().unwrap().to_string();
        assert!(e.contains("same folder"), "{e}");
    }
}
