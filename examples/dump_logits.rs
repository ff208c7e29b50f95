//! Writes the logits of a model (optionally with a PEFT adapter) for fixed token ids to a safetensors file, for
//! comparison with a Python reference (scripts/reference/peft_load_check.py, gguf_logits_check.py).
//!
//!     cargo run --release --example dump_logits -- MODEL_DIR OUT.safetensors [--adapter DIR] --ids 1,2,3 [--ids ..]
//!
//! Each `--ids` list is one sequence, run on its own (positions from 0), base weights dense f32. The file holds
//! `ids.{i}` (I32 [n]) and `logits.{i}` (F32 [n, vocab]).

use qlora_rt::models::formats::peft::load_adapter;
use qlora_rt::models::transformer::{BaseFormat, Batch, CausalLm};
use qlora_rt::{DType, Tape};
use safetensors::tensor::{Dtype, TensorView};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: dump_logits MODEL_DIR OUT.safetensors [--adapter DIR] --ids 1,2,3 [--ids ...]";
    let mut args = std::env::args().skip(1);
    let (model_dir, out) = match (args.next(), args.next()) {
        (Some(m), Some(o)) => (PathBuf::from(m), PathBuf::from(o)),
        _ => return Err(usage.into()),
    };
    let (mut adapter, mut sequences) = (None, Vec::<Vec<i32>>::new());
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(usage)?;
        match flag.as_str() {
            "--adapter" => adapter = Some(PathBuf::from(value)),
            "--ids" => sequences.push(value.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?),
            _ => return Err(usage.into()),
        }
    }
    if sequences.is_empty() || sequences.iter().any(|s| s.is_empty()) {
        return Err(usage.into());
    }

    let mut model = CausalLm::load(&model_dir, BaseFormat::Dense(DType::F32))?;
    if let Some(dir) = &adapter {
        let n = load_adapter(&mut model, dir)?;
        // Inference: LoRA dropout off (PEFT's eval mode), as `qlora-rt generate` and `eval` do.
        for proj in model.projections_mut()? {
            proj.adapter = proj.adapter.take().map(|a| a.without_dropout());
        }
        eprintln!("adapter {}: {n} modules", dir.display());
    }
    let vocab = model.config.vocab_size;
    let mut tensors: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = vec![];
    for (i, ids) in sequences.iter().enumerate() {
        let batch = Batch::pack(&[(ids.clone(), ids.clone())])?;
        let tape = Tape::new();
        let logits = tape.no_grad(|| model.logits(&tape, &batch, 0))?.value().to_vec::<f32>();
        assert_eq!(logits.len(), ids.len() * vocab);
        let id_bytes = ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let logit_bytes = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((format!("ids.{i}"), vec![ids.len()], Dtype::I32, id_bytes));
        tensors.push((format!("logits.{i}"), vec![ids.len(), vocab], Dtype::F32, logit_bytes));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, dtype, data)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize_to_file(views, None, &out)?;
    eprintln!("wrote {} ({} sequences, vocab {vocab})", out.display(), sequences.len());
    Ok(())
}
