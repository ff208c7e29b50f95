//! What a benchmark runs and where: the flags `bench` and `bench decode` share (a built-in architecture with random
//! NF4 weights from `qlora_models::synthetic`, or a model folder; the device and compute precision), and the model
//! they build from them. Must not own what is measured.

use crate::device::DeviceArg;
use crate::eval::DtypeArg;
use anyhow::Result;
use qlora_models::synthetic;
use qlora_models::transformer::{BaseFormat, CausalLm};
use qlora_models::ModelConfig;
use qlora_runtime::dist::Communicator;
use qlora_runtime::{DType, Device};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args)]
pub struct SubjectArgs {
    #[arg(long, value_name = "NAME", conflicts_with = "model", help = shape_help())]
    shape: Option<String>,
    /// Instead of --shape: a model folder (or .gguf file) as finetune takes it.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Where to run: auto, cpu or cuda.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Compute precision on CUDA (the CPU computes in f32).
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
}

fn shape_help() -> String {
    format!(
        "A built-in architecture, made in memory with random NF4 weights (no files needed): {}",
        synthetic::shape_names()
    )
}

impl SubjectArgs {
    /// What --shape or --model names, None when neither is given (the command says what it needs).
    pub fn subject(&self) -> Result<Option<Subject>> {
        Ok(match (&self.shape, &self.model) {
            (Some(name), _) => Some(Subject::Shape(name.clone())),
            (None, Some(dir)) => Some(Subject::Folder(crate::model_path::resolve_model(dir)?)),
            (None, None) => None,
        })
    }
}

/// What is benchmarked.
pub enum Subject {
    Shape(String),
    /// A model folder (a .gguf file or a Hub id already resolved to its imported folder or snapshot).
    Folder(PathBuf),
}

impl Subject {
    pub fn config(&self) -> Result<ModelConfig> {
        Ok(match self {
            Subject::Shape(name) => synthetic::shape_config(name)?,
            Subject::Folder(dir) => ModelConfig::load(dir)?,
        })
    }

    /// The model without adapters, its dense weights in `dense` where it is built here; with `shard`, its NF4
    /// base sharded across the group, this rank's shards on the device.
    pub fn model(
        &self,
        config: &ModelConfig,
        (format, dense): (BaseFormat, DType),
        seed: u64,
        shard: Option<(Arc<dyn Communicator>, Device)>,
    ) -> Result<CausalLm> {
        Ok(match (self, shard) {
            (Subject::Shape(_), shard) => {
                // Projections of one shape share their host bytes here, so building whole first costs little.
                let mut model = synthetic::build(config, format, dense, seed)?;
                if let Some((group, device)) = shard {
                    model.shard(group, device)?;
                }
                model
            }
            (Subject::Folder(dir), Some((group, device))) => CausalLm::load_sharded(dir, format, group, device)?,
            (Subject::Folder(dir), None) => CausalLm::load(dir, format)?,
        })
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subject::Shape(name) => f.write_str(name),
            Subject::Folder(dir) => write!(f, "{}", dir.display()),
        }
    }
}
