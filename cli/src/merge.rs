//! `qlora-rt merge --model DIR --adapter DIR --out DIR`: a PEFT LoRA/DoRA adapter folded into its base model,
//! written as a plain Hugging Face checkpoint that transformers loads without peft or bitsandbytes. Each adapted
//! projection becomes W' = merged_weight(W, adapter) with W the NF4-quantized base the adapter was trained
//! against (`--from nf4`, the default) or the original weight (`--from dense`); every other tensor is copied,
//! floats converted to `--dtype`. config.json loses its quantization_config and records the output dtype;
//! tokenizer, chat-template and generation files are copied. The folder appears whole or not at all. The adapted
//! weights are computed on the GPU when one is usable (`--device`): the same bytes as on the CPU, as every step of
//! `merged_weight` runs in the same order on both (the delta and DoRA's row norms in a fixed order).

use crate::device::{pick, DeviceArg};
use crate::model_path::{check_out, companion_files, resolve_model, write_json, Staging};
use anyhow::{bail, Context, Result};
use qlora_autograd::{merged_weight, LoraAdapter};
use qlora_models::formats::bnb;
use qlora_models::formats::checkpoint::Checkpoint;
use qlora_models::formats::peft::read_adapter;
use qlora_models::ModelConfig;
use qlora_runtime::nf4::DEFAULT_BLOCKSIZE;
use qlora_runtime::quant::{BaseWeight, Nf4Weight};
use qlora_runtime::{DType, Device};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum OutDtype {
    Bf16,
    F16,
    F32,
}

impl OutDtype {
    fn dtype(self) -> DType {
        match self {
            OutDtype::Bf16 => DType::BF16,
            OutDtype::F16 => DType::F16,
            OutDtype::F32 => DType::F32,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            OutDtype::Bf16 => "bfloat16",
            OutDtype::F16 => "float16",
            OutDtype::F32 => "float32",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum MergeFrom {
    /// The NF4-quantized base weights (what QLoRA trained the adapter against).
    Nf4,
    /// The original weights (a plain LoRA adapter); a 4-bit checkpoint is dequantized.
    Dense,
}

#[derive(clap::Args)]
pub struct MergeArgs {
    /// Base model: a Hugging Face folder (plain or saved 4-bit by bitsandbytes) or a .gguf file.
    #[arg(long, value_name = "DIR")]
    pub(crate) model: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a finetune --out.
    #[arg(long, value_name = "DIR")]
    pub(crate) adapter: PathBuf,
    /// Output folder; created if missing, refused if it exists and is not empty.
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// Dtype of every floating-point tensor written.
    #[arg(long, value_enum, default_value_t = OutDtype::Bf16)]
    pub(crate) dtype: OutDtype,
    /// Which base weights the adapter is added to.
    #[arg(long, value_enum, default_value_t = MergeFrom::Nf4)]
    pub(crate) from: MergeFrom,
    /// With --from nf4 on an unquantized model: quantize with f32 block scales, as finetune --no-double-quant
    /// trains (the default matches finetune's default, double quantization).
    #[arg(long)]
    pub(crate) no_double_quant: bool,
    /// Where the adapted weights are computed: auto (the GPU when one is usable), cuda or cpu. Either writes the
    /// same bytes.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub(crate) device: DeviceArg,
}

/// One tensor of the output: where it comes from and what it is written as.
enum Source {
    /// A decoder projection's weight, merged with its adapter when it has one.
    Projection { module: String, shape: [usize; 2] },
    /// A floating-point tensor converted to the output dtype.
    Float,
    /// Anything else, copied byte for byte.
    Raw,
}

struct Planned {
    name: String,
    source: Source,
    dtype: String,
    shape: Vec<usize>,
    size: usize,
}

fn float_dtype(stored: &str) -> bool {
    matches!(stored, "F64" | "F32" | "BF16" | "F16")
}

/// What [`merge`] wrote.
pub(crate) struct Merged {
    pub merged: usize,
    pub tensors: usize,
    pub bytes: usize,
    pub copied: usize,
}

pub fn run(args: &MergeArgs) -> Result<()> {
    let start = Instant::now();
    let Merged { merged, tensors, bytes, copied } = merge(args)?;
    println!(
        "merged {merged} adapted projection(s) into the {} base weights of {}",
        match args.from {
            MergeFrom::Nf4 => "NF4",
            MergeFrom::Dense => "original",
        },
        args.model.display()
    );
    println!(
        "wrote {}: model.safetensors ({tensors} tensors, {:.1} MB of {}), config.json and {copied} copied file(s) in {:.1}s",
        args.out.display(),
        bytes as f64 / 1e6,
        args.dtype.torch_name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The adapters moved to `device` once (each is read by one projection, but moving them all first keeps a GPU
/// failure ahead of the output's first byte).
fn on_device(adapters: BTreeMap<String, LoraAdapter>, device: Device) -> Result<BTreeMap<String, LoraAdapter>> {
    if device == Device::Cpu {
        return Ok(adapters);
    }
    adapters
        .into_iter()
        .map(|(module, ad)| {
            let moved = ad.to_device(device).with_context(|| format!("moving the adapter of {module} to {device}"))?;
            Ok((module, moved))
        })
        .collect()
}

/// Writes the merged checkpoint folder `args.out` (see the module docs).
pub(crate) fn merge(args: &MergeArgs) -> Result<Merged> {
    check_out(&args.out)?;
    let model_dir = resolve_model(&args.model)?;
    let config = ModelConfig::load(&model_dir)?;
    let config_path = model_dir.join("config.json");
    let config_text =
        std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?;
    let mut config_json: Value =
        serde_json::from_str(&config_text).with_context(|| format!("parsing {}", config_path.display()))?;
    let Some(obj) = config_json.as_object_mut() else { bail!("{}: not a JSON object", config_path.display()) };
    obj.remove("quantization_config");
    obj.insert("torch_dtype".into(), json!(args.dtype.torch_name()));
    obj.insert("dtype".into(), json!(args.dtype.torch_name()));

    let projections = config.projections();
    let adapters = read_adapter(&args.adapter, &projections).context("--adapter")?;
    if adapters.is_empty() {
        bail!("--adapter {}: adapts no projection of this model", args.adapter.display());
    }
    let ck = Checkpoint::open(&model_dir)?;
    let out_dtype = args.dtype.dtype();
    // f32 on either device: the merge's arithmetic is the same (`merged_weight`), only where it runs changes.
    let (device, _) = pick(args.device, DType::F32, "merging")?;
    let adapters = on_device(adapters, device)?;

    // The plan: every tensor's name, dtype and shape, so the header is written before any weight is computed.
    let by_weight: HashMap<String, (&String, [usize; 2])> =
        projections.iter().map(|(m, s)| (format!("{m}.weight"), (m, *s))).collect();
    let mut names: Vec<&str> = ck.names();
    names.sort_unstable();
    let mut plan = Vec::with_capacity(names.len());
    for name in names {
        // bitsandbytes' quant-state tensors (`{module}.weight.absmax`, ...) are consumed with their weight.
        let quant_aux =
            name.rsplit_once(".weight.").is_some_and(|(m, _)| by_weight.contains_key(&format!("{m}.weight")));
        // Tied embeddings stay tied: transformers rebuilds lm_head from embed_tokens.
        if quant_aux || (config.tie_word_embeddings && name == "lm_head.weight") {
            continue;
        }
        let (stored, shape) = ck.info(name)?;
        let (source, dtype, shape) = match by_weight.get(name) {
            Some((module, s)) => (
                Source::Projection { module: (*module).clone(), shape: *s },
                out_dtype.safetensors_name().to_string(),
                s.to_vec(),
            ),
            None if float_dtype(&stored) => (Source::Float, out_dtype.safetensors_name().to_string(), shape),
            None => (Source::Raw, stored, shape),
        };
        let size = match source {
            Source::Raw => ck.bytes(name)?.len(),
            _ => shape.iter().product::<usize>() * out_dtype.size_in_bytes(),
        };
        plan.push(Planned { name: name.to_string(), source, dtype, shape, size });
    }

    let mut header = Map::new();
    let mut offset = 0usize;
    for p in &plan {
        header.insert(
            p.name.clone(),
            json!({"dtype": p.dtype, "shape": p.shape, "data_offsets": [offset, offset + p.size]}),
        );
        offset += p.size;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut header = serde_json::to_string(&header)?;
    while header.len() % 8 != 0 {
        header.push(' ');
    }

    let staging = Staging::new(&args.out, "merge")?;
    let weights = staging.path.join("model.safetensors");
    let f = std::fs::File::create(&weights).with_context(|| format!("creating {}", weights.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let io = |e: std::io::Error| anyhow::Error::new(e).context(format!("writing {}", weights.display()));
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let double_quant = !args.no_double_quant;
    let mut merged = 0usize;
    for p in &plan {
        let bytes = match &p.source {
            Source::Raw => ck.bytes(&p.name)?.to_vec(),
            Source::Float => ck.load(&p.name)?.to_dtype(out_dtype).to_bytes(),
            Source::Projection { module, shape } => {
                let prequantized = bnb::load_linear(&ck, module, *shape)?;
                let tensor = match (adapters.get(module), prequantized) {
                    (None, Some(w)) => w.dequantize(DType::F32)?.to_dtype(out_dtype),
                    (None, None) => ck.load_shaped(&p.name, shape)?.to_dtype(out_dtype),
                    (Some(adapter), prequantized) => {
                        let base = match (prequantized, args.from) {
                            (Some(w), MergeFrom::Nf4) => BaseWeight::Nf4(w),
                            (Some(w), MergeFrom::Dense) => BaseWeight::Dense(w.dequantize(DType::F32)?),
                            (None, MergeFrom::Dense) => BaseWeight::Dense(ck.load_shaped(&p.name, shape)?),
                            (None, MergeFrom::Nf4) => {
                                // Exactly as CausalLm::load quantizes for training.
                                let w = ck.load_shaped(&p.name, shape)?;
                                BaseWeight::Nf4(
                                    Nf4Weight::quantize(&w, DEFAULT_BLOCKSIZE, double_quant)
                                        .map_err(|e| ck.tensor_error(&p.name, e.to_string()))?,
                                )
                            }
                        };
                        merged += 1;
                        let merge =
                            || merged_weight(&base.to_device(device)?, adapter, out_dtype)?.to_device(Device::Cpu);
                        merge().with_context(|| format!("merging {module} on {device}"))?
                    }
                };
                tensor.to_bytes()
            }
        };
        debug_assert_eq!(bytes.len(), p.size, "{}", p.name);
        w.write_all(&bytes).map_err(io)?;
    }
    let f = w.into_inner().map_err(|e| io(e.into_error()))?;
    f.sync_all().map_err(io)?;

    let mut copied = 0usize;
    for path in &companion_files(&model_dir)? {
        let name = path.file_name().context("a listed file has a name")?;
        std::fs::copy(path, staging.path.join(name))
            .with_context(|| format!("copying {} to {}", path.display(), staging.path.display()))?;
        copied += 1;
    }
    write_json(&staging.path.join("config.json"), &config_json)?;
    staging.publish()?;
    Ok(Merged { merged, tensors: plan.len(), bytes: offset, copied })
}
