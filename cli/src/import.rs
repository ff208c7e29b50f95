//! `qlora-rt import --gguf FILE --out DIR`: a llama.cpp GGUF model as a Hugging Face model folder (config.json,
//! model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json). The mapping is
//! `qlora_models::formats::gguf`'s, the folder handling (refusing to overwrite, streaming the weights out one
//! tensor at a time, making the folder appear whole or not at all) `crate::model_path`'s; this file reports.

use crate::model_path::{import_gguf, Imported, WeightDtype};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// GGUF file (llama, gemma, gemma2 or gemma3 architecture; F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
    /// and Q2_K..Q6_K tensors).
    #[arg(long, value_name = "FILE")]
    gguf: PathBuf,
    /// Output folder; created if missing, refused if it exists and is not empty.
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Dtype of the weight matrices and embeddings in model.safetensors. The default f32 holds every GGUF type's
    /// dequantized values exactly (ggml dequantizes to f32); bf16 halves the file but rounds them (SmolLM2's Q4_1:
    /// 2.2474 nats through bf16 against 2.2502 through f32, the value llama.cpp computes). Norm weights are always
    /// f32.
    #[arg(long, value_enum, default_value_t = WeightDtype::F32)]
    dtype: WeightDtype,
}

pub fn run(args: &ImportArgs) -> Result<()> {
    let start = Instant::now();
    let Imported { file, import, mapped, weight_bytes, torch_dtype } = import_gguf(&args.gguf, &args.out, args.dtype)?;
    let out = &args.out;

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
