//! The embedding lookup (forward only: QLoRA freezes the table, so its backward never runs in training).

use super::{dims, models, Bench, Work, TOKENS};
use anyhow::Result;
use qlora_kernels::cuda::embedding::embedding_forward;

pub fn run(b: &mut Bench) -> Result<()> {
    let name = "embedding fwd";
    if !b.wants(name) {
        return Ok(());
    }
    for (model, c) in models()? {
        let (v, h, t) = (c.vocab_size, c.hidden_size, TOKENS);
        let table = b.normal_bf16(v * h, 0.02)?;
        let ids = b.ids(t, v)?;
        let mut out = b.dev.alloc(t * h)?;
        // The gathered rows are read once and the output written once; the table's other rows are never touched.
        let bytes = (2 * 2 * t * h + 4 * t) as f64;
        let shape = format!("{model} table {} → {} bf16", dims(&[v, h]), dims(&[t, h]));
        b.row(name, &shape, Work::Bytes(bytes), |_| Ok(embedding_forward(&table, &ids, h, &mut out)?))?;
    }
    Ok(())
}
