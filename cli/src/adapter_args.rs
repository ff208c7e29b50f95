//! The base-weight and adapter flags that `finetune` and `bench` share, so that a bench measures exactly what a
//! default fine-tune trains.

use crate::eval::Quantize;
use anyhow::{bail, ensure, Result};
use qlora_autograd::{LoraConfig, LoraInit};
use qlora_models::config::projection_kinds;
use qlora_models::transformer::BaseFormat;
use qlora_runtime::DType;

#[derive(clap::Args, Clone, Debug)]
pub struct AdapterArgs {
    /// Base weights: nf4 (QLoRA's 4-bit NormalFloat, blocks of 64) or none (dense, plain LoRA).
    #[arg(long, value_enum, default_value_t = Quantize::Nf4)]
    pub quantize: Quantize,
    /// Quantize the NF4 block scales too (QLoRA's double quantization) [default: on].
    #[arg(long, overrides_with = "no_double_quant")]
    double_quant: bool,
    /// Keep the NF4 block scales in f32.
    #[arg(long, overrides_with = "double_quant")]
    no_double_quant: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub r: usize,
    /// LoRA alpha: the adapter is scaled by alpha/r (alpha/√r with --rslora).
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    /// Dropout on the adapter's input while training (never while evaluating; the peer benchmarks use 0).
    #[arg(long, default_value_t = 0.05)]
    pub dropout: f64,
    /// Projections to adapt: all-linear, or a comma list of q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.
    #[arg(long, value_name = "LIST", default_value = "all-linear")]
    target_modules: String,
    /// rsLoRA: scale by alpha/√r, which keeps large ranks learning.
    #[arg(long)]
    pub rslora: bool,
    /// DoRA: a trainable magnitude per output row on top of the low-rank direction update.
    #[arg(long)]
    pub dora: bool,
}

impl AdapterArgs {
    pub fn check(&self) -> Result<()> {
        ensure!(self.r >= 1, "--r must be at least 1");
        ensure!(self.alpha.is_finite() && self.alpha > 0.0, "--alpha must be a positive number, got {}", self.alpha);
        ensure!((0.0..1.0).contains(&self.dropout), "--dropout must be in [0, 1), got {}", self.dropout);
        ensure!(
            self.quantize == Quantize::Nf4 || !self.double_quant,
            "--double-quant needs --quantize nf4 (use --no-double-quant or drop the flag)"
        );
        Ok(())
    }

    /// Whether the NF4 block scales are quantized: the last of --double-quant / --no-double-quant wins (clap clears
    /// the other), neither means on; never for a dense base.
    pub fn double_quant(&self) -> bool {
        self.quantize == Quantize::Nf4 && (self.double_quant || !self.no_double_quant)
    }

    /// The base as training loads it: NF4 in blocks of 64 (scales double-quantized or not), or dense f32.
    pub fn base_format(&self) -> BaseFormat {
        self.quantize.base_format(self.double_quant(), DType::F32)
    }

    pub fn targets(&self) -> Result<Vec<&'static str>> {
        parse_targets(&self.target_modules)
    }

    pub fn lora_config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            use_rslora: self.rslora,
            use_dora: self.dora,
            dropout: self.dropout,
            init: LoraInit::Default,
        }
    }

    /// The base's format in words.
    pub fn base_name(&self) -> &'static str {
        match (self.quantize, self.double_quant()) {
            (Quantize::Nf4, true) => "NF4 + double quantization",
            (Quantize::Nf4, false) => "NF4",
            (Quantize::None, _) => "dense f32",
        }
    }

    /// The method's usual name: QLoRA, QDoRA, LoRA or DoRA.
    pub fn method(&self) -> &'static str {
        match (self.quantize, self.dora) {
            (Quantize::Nf4, false) => "QLoRA",
            (Quantize::Nf4, true) => "QDoRA",
            (Quantize::None, false) => "LoRA",
            (Quantize::None, true) => "DoRA",
        }
    }

    /// The adapter in words: "r 16, alpha 16, rsLoRA, DoRA".
    pub fn adapter_name(&self) -> String {
        let (rs, dora) = (if self.rslora { ", rsLoRA" } else { "" }, if self.dora { ", DoRA" } else { "" });
        format!("r {}, alpha {}{rs}{dora}", self.r, self.alpha)
    }
}

/// The module suffixes `--target-modules` names; an unknown name is an error listing the known ones.
fn parse_targets(spec: &str) -> Result<Vec<&'static str>> {
    let spec = spec.trim();
    let kinds = projection_kinds();
    if spec == "all-linear" {
        return Ok(kinds.to_vec());
    }
    let mut out = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some(&known) = kinds.iter().find(|p| **p == name) else {
            bail!("--target-modules: unknown module \"{name}\" (all-linear, or any of {})", kinds.join(","));
        };
        if !out.contains(&known) {
            out.push(known);
        }
    }
    ensure!(!out.is_empty(), "--target-modules names no module");
    Ok(out)
}
