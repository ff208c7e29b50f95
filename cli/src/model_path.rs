//! Model paths shared by every command that takes `--model`: a Hugging Face folder is used as is; a Hub id
//! `ORG/NAME` that is not a local folder is the Hub cache's snapshot ([`crate::hub`]); a `.gguf` file
//! is imported once into a cache folder (`$QLORA_RT_CACHE/gguf/<stem>-<size>-<mtime hash>`, the cache root
//! defaulting to `${XDG_CACHE_HOME:-~/.cache}/qlora-rt`) and that folder is used. Also owns what the commands
//! that write a model folder share: refusing a non-empty `--out`, and a hidden staging folder beside it that is
//! renamed into place only once complete.

use anyhow::{bail, ensure, Context, Result};
use qlora_models::formats::gguf::{GgufFile, HfImport};
use qlora_models::ModelConfig;
use qlora_runtime::{DType, Tensor};
use serde_json::{json, Map, Value};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Refuses an `out` that exists and is not an empty folder.
pub fn check_out(out: &Path) -> Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            ensure!(
                entries.next().is_none(),
                "--out {} exists and is not empty; give a new or empty folder",
                out.display()
            );
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("--out {}", out.display())),
    }
}

/// A hidden sibling folder of `out` (`.{name}.{tag}-{pid}`) that receives every file, then is renamed to `out`
/// by [`Staging::publish`]: an interrupted writer never leaves a folder that looks like a model but lacks files.
/// Removed on drop unless published.
pub struct Staging {
    pub path: PathBuf,
    out: PathBuf,
    parent: PathBuf,
    done: bool,
}

impl Staging {
    /// Creates the staging folder (and `out`'s parent). `out` must have passed [`check_out`].
    pub fn new(out: &Path, tag: &str) -> Result<Self> {
        let Some(name) = out.file_name() else { bail!("--out {} must name a folder", out.display()) };
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
        let path = parent.join(format!(".{}.{tag}-{}", name.to_string_lossy(), std::process::id()));
        // A leftover of a killed run with the same pid is stale by construction.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Staging { path, out: out.to_path_buf(), parent, done: false })
    }

    /// Renames the staging folder to `out` (rename(2) replaces an empty folder, the only kind check_out allows)
    /// and makes the rename durable.
    pub fn publish(mut self) -> Result<()> {
        std::fs::rename(&self.path, &self.out)
            .with_context(|| format!("moving {} to {}", self.path.display(), self.out.display()))?;
        self.done = true;
        std::fs::File::open(&self.parent)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", self.parent.display()))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes `value` as pretty JSON and fsyncs it.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))
}

/// Dtype of the weight matrices and embeddings of an imported GGUF model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightDtype {
    Bf16,
    F32,
}

/// What [`import_gguf`] read and wrote.
pub struct Imported {
    pub file: GgufFile,
    pub import: HfImport,
    /// Time to read and map the GGUF file.
    pub mapped: Duration,
    pub weight_bytes: usize,
    pub torch_dtype: &'static str,
}

/// Writes model.safetensors: the header (every tensor's dtype, shape and offsets, known before any is read),
/// then each tensor dequantized and converted in turn, so memory holds one tensor at a time.
fn write_safetensors(path: &Path, file: &GgufFile, import: &HfImport, dtype: WeightDtype) -> Result<usize> {
    // Norms (1-D) stay f32; matrices take the requested dtype.
    let stored = |shape: &[usize]| if shape.len() == 1 || dtype == WeightDtype::F32 { DType::F32 } else { DType::BF16 };
    let mut header = Map::new();
    let mut offset = 0usize;
    for t in &import.tensors {
        let dt = stored(&t.shape);
        let size = t.shape.iter().product::<usize>() * dt.size_in_bytes();
        let entry = json!({"dtype": dt.safetensors_name(), "shape": t.shape, "data_offsets": [offset, offset + size]});
        header.insert(t.name.clone(), entry);
        offset += size;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut header = serde_json::to_string(&header)?;
    // safetensors pads the header with spaces so that the data starts 8-byte aligned.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let io = |e: std::io::Error| anyhow::Error::new(e).context(format!("writing {}", path.display()));
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    for t in &import.tensors {
        let values = t.load(file)?;
        let bytes = Tensor::from_vec(values, &t.shape)?.to_dtype(stored(&t.shape)).to_bytes();
        w.write_all(&bytes).map_err(io)?;
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;
    Ok(offset)
}

/// Converts the GGUF file `gguf` into the Hugging Face folder `out` (config.json, generation_config.json,
/// tokenizer.json, tokenizer_config.json, model.safetensors), which appears whole or not at all. `out` must be
/// new or empty.
pub fn import_gguf(gguf: &Path, out: &Path, dtype: WeightDtype) -> Result<Imported> {
    check_out(out)?;
    let start = Instant::now();
    let file = GgufFile::open(gguf)?;
    let torch_dtype = match dtype {
        WeightDtype::Bf16 => "bfloat16",
        WeightDtype::F32 => "float32",
    };
    let import = HfImport::new(&file, torch_dtype)?;
    let config_text = serde_json::to_string_pretty(&import.config)?;
    // What this runtime will read back must parse now, not after the weights are written.
    ModelConfig::parse(&config_text, &out.join("config.json"))?;
    let mapped = start.elapsed();

    let staging = Staging::new(out, "import")?;
    let dir = staging.path.clone();
    write_json(&dir.join("config.json"), &import.config)?;
    write_json(&dir.join("generation_config.json"), &import.generation_config)?;
    write_json(&dir.join("tokenizer.json"), &import.tokenizer)?;
    write_json(&dir.join("tokenizer_config.json"), &import.tokenizer_config)?;
    let weight_bytes = write_safetensors(&dir.join("model.safetensors"), &file, &import, dtype)?;
    staging.publish()?;
    Ok(Imported { file, import, mapped, weight_bytes, torch_dtype })
}

/// Whether `path` names a GGUF file (by extension, any case).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The cache root: `$QLORA_RT_CACHE`, else `$XDG_CACHE_HOME/qlora-rt`, else `~/.cache/qlora-rt`.
fn cache_root() -> Result<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("QLORA_RT_CACHE") {
        return Ok(dir);
    }
    if let Some(dir) = var("XDG_CACHE_HOME") {
        return Ok(dir.join("qlora-rt"));
    }
    match var("HOME") {
        Some(home) => Ok(home.join(".cache").join("qlora-rt")),
        None => bail!("no cache folder for the imported GGUF model: set QLORA_RT_CACHE (or XDG_CACHE_HOME or HOME)"),
    }
}

/// FNV-1a, 64-bit: a stable hash (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The cache folder of GGUF file `gguf`: `<cache>/gguf/<file stem>-<size>-<hash of mtime>-f32`, so that a file
/// replaced in place (new size or mtime) is imported again (`-f32`: imports made before they were lossless, in
/// bf16, are not reused).
pub fn gguf_cache_dir(gguf: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(gguf).with_context(|| format!("--model {}", gguf.display()))?;
    ensure!(meta.is_file(), "--model {}: a .gguf path must be a file", gguf.display());
    let mtime =
        meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let stem = gguf.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let key = format!("{stem}-{}-{:016x}-f32", meta.len(), fnv1a(&mtime.to_le_bytes()));
    Ok(cache_root()?.join("gguf").join(key))
}

/// The Hugging Face model folder of `path`: `path` itself; for a Hub id `ORG/NAME` naming no local folder, its
/// snapshot in the Hub cache (downloaded there first when missing); for a `.gguf` file its cache folder,
/// importing it there first (f32 weights, exact, as `qlora-rt import` writes by default) when it is not cached yet.
pub fn resolve_model(path: &Path) -> Result<PathBuf> {
    if !is_gguf(path) {
        return match path.to_str() {
            // A local folder of that name wins over the Hub.
            Some(id) if !path.exists() && crate::hub::is_repo_id(id) => crate::hub::resolve(id),
            _ => Ok(path.to_path_buf()),
        };
    }
    let dir = gguf_cache_dir(path)?;
    // An import publishes its folder whole, so a config.json there means a finished import.
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    // A folder without config.json is not one of ours: never delete it, but never use it either.
    check_out(&dir).with_context(|| format!("cache folder for {}", path.display()))?;
    eprintln!("qlora-rt: importing {} into {} (once; later runs reuse it)", path.display(), dir.display());
    match import_gguf(path, &dir, WeightDtype::F32) {
        Ok(_) => Ok(dir),
        // Another process may have finished the same import first.
        Err(_) if dir.join("config.json").is_file() => Ok(dir),
        Err(e) => Err(e.context(format!("importing {}", path.display()))),
    }
}

/// The files of `dir` that a model folder carries besides its weights and config.json (tokenizer, chat-template and
/// generation-config files, as `save_pretrained` writes them), sorted: what commands writing a model folder copy
/// unchanged.
pub fn companion_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    files.retain(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(is_companion_file));
    files.sort();
    Ok(files)
}

pub fn is_companion_file(name: &str) -> bool {
    name.starts_with("tokenizer")
        || name.starts_with("chat_template")
        || matches!(
            name,
            "generation_config.json" | "special_tokens_map.json" | "added_tokens.json" | "vocab.json" | "merges.txt"
        )
}
