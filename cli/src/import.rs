//! `qlora-rt import --gguf FILE --out DIR`: a llama.cpp GGUF model as a Hugging Face model folder (config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json). The mapping is
//! `qlora_models::gguf`'s; this file owns the folder: refusing to overwrite, streaming the weights out one
//! tensor at a time, and making the folder appear whole or not at all.

use anyhow::{bail, ensure, Context, Result};
use qlora_models::gguf::{GgufFile, HfImport};
use qlora_models::ModelConfig;
use qlora_runtime::{DType, Tensor};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WeightDtype {
    Bf16,
    F32,
}

#[derive(clap::Args)]
pub struct ImportArgs {
    /// GGUF file (llama, gemma, gemma2 or gemma3 architecture; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
    /// and Q2_K..Q6_K tensors).
    #[arg(long, value_name = "FILE")]
    gguf: PathBuf,
    /// Output folder; created if missing, refused if it exists and is not empty.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Dtype of the weight matrices and embeddings in model.safetensors. Norm weights are always written as
    /// f32: they are tiny and GGUF stores them in f32.
    #[arg(long, value_enum, default_value_t = WeightDtype::Bf16)]
    dtype: WeightDtype,
}

/// Removes the staging folder unless the import finished.
struct Staging {
    path: PathBuf,
    done: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Refuses an `out` that exists and is not an empty folder.
fn check_out(out: &Path) -> Result<()> {
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

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).with_context(|| format!("writing {}", path.display()))
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

pub fn run(args: &ImportArgs) -> Result<()> {
    check_out(&args.out)?;
    let start = Instant::now();
    let file = GgufFile::open(&args.gguf)?;
    let torch_dtype = match args.dtype {
        WeightDtype::Bf16 => "bfloat16",
        WeightDtype::F32 => "float32",
    };
    let import = HfImport::new(&file, torch_dtype)?;
    let config_text = serde_json::to_string_pretty(&import.config)?;
    // What this runtime will read back must parse now, not after the weights are written.
    ModelConfig::parse(&config_text, &args.out.join("config.json"))?;
    let mapped = start.elapsed();

    // Everything goes to a hidden sibling folder renamed into place at the end: an interrupted import never
    // leaves a folder that looks like a model but lacks files.
    let out = &args.out;
    let Some(name) = out.file_name() else { bail!("--out {} must name a folder", out.display()) };
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut staging = Staging {
        path: parent.join(format!(".{}.import-{}", name.to_string_lossy(), std::process::id())),
        done: false,
    };
    std::fs::create_dir(&staging.path).with_context(|| format!("creating {}", staging.path.display()))?;
    let dir = staging.path.clone();
    write_json(&dir.join("config.json"), &import.config)?;
    write_json(&dir.join("generation_config.json"), &import.generation_config)?;
    write_json(&dir.join("tokenizer.json"), &import.tokenizer)?;
    write_json(&dir.join("tokenizer_config.json"), &import.tokenizer_config)?;
    let weight_bytes = write_safetensors(&dir.join("model.safetensors"), &file, &import, args.dtype)?;
    // rename(2) replaces an empty folder; check_out allowed only that.
    std::fs::rename(&dir, out).with_context(|| format!("moving {} to {}", dir.display(), out.display()))?;
    staging.done = true;
    std::fs::File::open(parent).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", parent.display()))?;

    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for t in file.tensors() {
        *by_type.entry(t.ty.name()).or_default() += 1;
    }
    let types: Vec<String> = by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
    let hp = &import.hyper;
    let params: usize = import.tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    println!(
        "{} (GGUF v{}, {} tensors: {}) read and mapped in {:.2}s",
        args.gguf.display(),
        file.version(),
        file.tensors().len(),
        types.join(", "),
        mapped.as_secs_f64()
    );
    println!(
        "{:?}: {} layers, hidden {}, {} heads / {} KV heads, vocab {}{}; {:.1} M parameters",
        hp.family,
        hp.layers,
        hp.hidden,
        hp.heads,
        hp.kv_heads,
        hp.vocab,
        if hp.tied { ", tied embeddings" } else { "" },
        params as f64 / 1e6
    );
    println!(
        "wrote {} ({} tensors, {:.1} MB of {torch_dtype} weights and f32 norms) in {:.1}s",
        out.display(),
        import.tensors.len(),
        weight_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
