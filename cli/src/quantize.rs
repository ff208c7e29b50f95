//! `qlora-rt quantize`: writes a Hugging Face model folder as the 4-bit NF4 checkpoint that transformers +
//! bitsandbytes save (`from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
//! bnb_4bit_quant_type="nf4", ...))` then `save_pretrained`): the same model.safetensors and config.json byte for
//! byte, with the tokenizer, generation-config and chat-template files copied. The format is `qlora_models::formats::bnb`'s;
//! this file owns the folders: refusing to overwrite, writing each file atomically.

use crate::model_path::{check_out, companion_files};
use anyhow::{ensure, Context, Result};
use qlora_models::formats::bnb::{self, QuantizeOptions};
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::fsutil::{write_atomic, write_atomic_with};
use qlora_models::ModelConfig;
use qlora_runtime::DType;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// Hugging Face model folder: config.json and safetensors weights (Llama, Gemma 1/2/3).
    #[arg(long)]
    model: PathBuf,
    /// Output folder; created if missing, refused if it exists and is not empty.
    #[arg(long)]
    out: PathBuf,
    /// Double quantization (bnb_4bit_use_double_quant): about 4.127 instead of 4.5 bits per parameter.
    #[arg(long)]
    double_quant: bool,
    /// NF4 block size, a power of two in 32..=4096 (transformers always uses 64).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// bnb_4bit_compute_dtype recorded in config.json (transformers' default float32; QLoRA recipes use bfloat16).
    #[arg(long, default_value = "float32", value_parser = ["float32", "bfloat16", "float16"])]
    compute_dtype: String,
}

/// Creates `out`, or accepts it empty: a quantized model is never written over another folder's files.
fn prepare_out(out: &Path) -> Result<()> {
    check_out(out)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating --out {}", out.display()))
}

pub fn run(args: &QuantizeArgs) -> Result<()> {
    ensure!(
        args.blocksize.is_power_of_two() && (32..=4096).contains(&args.blocksize),
        "--blocksize must be a power of two in 32..=4096, got {}",
        args.blocksize
    );
    let compute_dtype = match args.compute_dtype.as_str() {
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        _ => DType::F32,
    };
    let opts = QuantizeOptions { blocksize: args.blocksize, double_quant: args.double_quant, compute_dtype };
    let model = &crate::model_path::resolve_model(&args.model)?;
    // Parsing the config refuses families and layouts qlora-rt cannot train before any work is done.
    ModelConfig::load(model)?;
    let config_path = model.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let config_json = bnb::quantized_config_json(&config_text, &config_path, opts)?;
    let ck = Checkpoint::open(model)?;
    ensure!(
        ck.names().into_iter().any(bnb::is_decoder_linear),
        "{}: no decoder linear weight (model.layers.{{i}}.self_attn.*_proj, mlp.*_proj) to quantize",
        model.display()
    );
    prepare_out(&args.out)?;

    let weights = args.out.join("model.safetensors");
    let mut summary = None;
    write_atomic_with(&weights, |file| {
        let mut out = BufWriter::new(file);
        summary = Some(bnb::write_quantized(&ck, opts, &mut out, &weights).map_err(std::io::Error::other)?);
        out.flush()
    })?;
    let summary = summary.context("the weights writer returned without a summary")?;

    let companions = companion_files(model)?;
    for path in &companions {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path.file_name().context("a listed file has a name")?;
        write_atomic(&args.out.join(name), &bytes)?;
    }
    // config.json last: a folder without it is visibly incomplete if anything above failed.
    write_atomic(&args.out.join("config.json"), config_json.as_bytes())?;

    println!(
        "quantized {} linear layers ({} parameters) to NF4{}, block {}: {:.3} bits/param",
        summary.linears,
        summary.params,
        if args.double_quant { " with double quantization" } else { "" },
        args.blocksize,
        summary.bits_per_param()
    );
    println!(
        "wrote {}: model.safetensors ({} tensors), config.json and {} copied file(s)",
        args.out.display(),
        summary.tensors,
        companions.len()
    );
    Ok(())
}
