//! `qlora-rt export-gguf --model DIR [--adapter DIR] --out FILE --type TYPE`: a model (with a PEFT adapter merged
//! in first, as `qlora-rt merge` writes it in bf16) as one GGUF file llama.cpp loads. The GGUF layout, metadata,
//! per-tensor type mix and quantizers are `qlora_models::formats::gguf`'s (`export`, `ftype`, `quant`); this file
//! resolves the inputs, runs the merge into a hidden folder beside the output (removed afterwards) and reports.
//! The file appears whole or not at all.

use crate::device::DeviceArg;
use crate::merge::{merge, MergeArgs, MergeFrom, OutDtype};
use crate::model_path::resolve_model;
use anyhow::{bail, Context, Result};
use qlora_models::formats::gguf::export::{arch_name, export};
use qlora_models::formats::gguf::ftype::FileType;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `--type`: llama.cpp's file types, each with llama-quantize's per-tensor mix.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ExportType {
    /// Every matrix f32 (lossless; a source for llama-quantize).
    #[value(name = "f32")]
    F32,
    /// Every matrix f16.
    #[value(name = "f16")]
    F16,
    /// 8.5 bits per weight; near lossless.
    #[value(name = "q8_0")]
    Q8_0,
    /// 6.6 bits; the output matrix (or shared embedding) Q8_0 when its rows are not whole 256-blocks.
    #[value(name = "q6_k")]
    Q6_K,
    /// Q5_K, with attn_v/ffn_down of the first and last eighth of the layers and every third between Q6_K, the
    /// output matrix Q6_K.
    #[value(name = "q5_k_m")]
    Q5_K_M,
    /// Q4_K with the same Q6_K layers as q5_k_m: the type most GGUF downloads use.
    #[value(name = "q4_k_m")]
    Q4_K_M,
    /// Legacy 4-bit (output matrix / shared embedding Q6_K or Q8_0, as llama-quantize keeps it).
    #[value(name = "q4_0")]
    Q4_0,
    /// Legacy 4-bit with a minimum per block (output matrix as q4_0).
    #[value(name = "q4_1")]
    Q4_1,
}

impl ExportType {
    fn file_type(self) -> FileType {
        match self {
            ExportType::F32 => FileType::F32,
            ExportType::F16 => FileType::F16,
            ExportType::Q8_0 => FileType::Q8_0,
            ExportType::Q6_K => FileType::Q6_K,
            ExportType::Q5_K_M => FileType::Q5_K_M,
            ExportType::Q4_K_M => FileType::Q4_K_M,
            ExportType::Q4_0 => FileType::Q4_0,
            ExportType::Q4_1 => FileType::Q4_1,
        }
    }
}

#[derive(clap::Args)]
pub struct ExportGgufArgs {
    /// Model: a Hugging Face folder (plain, or saved 4-bit by bitsandbytes, which is dequantized) or a .gguf file.
    #[arg(long, value_name = "DIR")]
    model: PathBuf,
    /// PEFT LoRA/DoRA adapter folder to merge into the model first (as `qlora-rt merge` does, in bf16).
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,
    /// Output GGUF file; refused if it exists.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// File type. The quantized ones choose each matrix's type as llama-quantize does (the output matrix and the
    /// sensitive attn_v/ffn_down layers higher; a matrix whose rows are not whole blocks falls back to a 32-value
    /// type, or f16) and quantize as it does without an importance matrix; norms are f32. With a merged adapter
    /// use q8_0, q6_k or q5_k_m: a fine-tune's changes are small against the weights, and the 4-bit types lose
    /// much of them (measured in models/src/formats/gguf/RESULTS.md).
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    ty: ExportType,
    /// With --adapter: which base weights the adapter is added to (see `qlora-rt merge --from`).
    #[arg(long, value_enum, default_value_t = MergeFrom::Nf4)]
    from: MergeFrom,
    /// With --adapter and --from nf4 on an unquantized model: f32 block scales (see `qlora-rt merge`).
    #[arg(long)]
    no_double_quant: bool,
    /// With --adapter: where the merge runs (see `qlora-rt merge --device`).
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// Removes the merged folder however the export ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Refuses an output that exists or whose folder does not.
fn check_out_file(out: &Path) -> Result<()> {
    if out.exists() {
        bail!("--out {} exists; give a new file path", out.display());
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("--out {}: {} is not an existing folder", out.display(), parent.display());
    }
    if out.file_name().is_none() {
        bail!("--out {} must name a file", out.display());
    }
    Ok(())
}

pub fn run(args: &ExportGgufArgs) -> Result<()> {
    let start = Instant::now();
    check_out_file(&args.out)?;
    if !args.model.exists() {
        bail!("--model {}: no such file or folder", args.model.display());
    }
    let model_dir = resolve_model(&args.model)?;
    let _merged_dir;
    let source = match &args.adapter {
        None => model_dir,
        Some(adapter) => {
            let name = args.out.file_name().context("--out names a file")?.to_string_lossy().into_owned();
            let dir = args.out.with_file_name(format!(".{name}.merged-{}", std::process::id()));
            // A leftover of a killed run with the same pid is stale by construction.
            let _ = std::fs::remove_dir_all(&dir);
            _merged_dir = TempDir(dir.clone());
            let m = merge(&MergeArgs {
                model: model_dir,
                adapter: adapter.clone(),
                out: dir.clone(),
                dtype: OutDtype::Bf16,
                from: args.from,
                no_double_quant: args.no_double_quant,
                device: args.device,
            })
            .with_context(|| format!("merging {}", adapter.display()))?;
            println!("merged {} adapted projection(s) of {} (bf16)", m.merged, adapter.display());
            dir
        }
    };
    let name = args.model.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let summary = export(&source, &args.out, args.ty.file_type(), &name)?;
    let types: Vec<String> = summary.by_type.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "wrote {} (GGUF v3, {}, {} tensors: {}; {:.3} M parameters, {:.2} MB) in {:.1}s",
        args.out.display(),
        arch_name(summary.family),
        summary.tensors,
        types.join(", "),
        summary.parameters as f64 / 1e6,
        summary.file_bytes as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
