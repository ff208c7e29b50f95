//! Writing a whole checkpoint in bitsandbytes' 4-bit form, streamed, and the config.json that goes with it.

use super::python::{py_json_pretty, torch_dtype_name};
use super::{is_decoder_linear, QuantState, NF4_SOURCE_DTYPES, QUANT_STATE_NF4};
use crate::error::{Error, Result};
use crate::formats::checkpoint::Checkpoint;
use qlora_runtime::nf4::NF4_CODE;
use qlora_runtime::quant::{Absmax, Nf4Weight};
use qlora_runtime::DType;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

/// How `qlora-rt quantize` quantizes (transformers' `BitsAndBytesConfig` with nf4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantizeOptions {
    pub blocksize: usize,
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`, recorded in config.json only (it does not change the stored bytes).
    pub compute_dtype: DType,
}

/// One stored tensor of a quantized linear: name, dtype, shape, bytes.
pub(super) struct Part {
    pub(super) name: String,
    pub(super) dtype: Dtype,
    pub(super) shape: Vec<usize>,
    pub(super) data: Vec<u8>,
}

/// The tensors bnb's `_save_to_state_dict` writes for one 4-bit linear, `weight` being `{module}.weight`.
pub(super) fn linear_parts(weight: &str, w: &Nf4Weight) -> Vec<Part> {
    let part = |suffix: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>| Part {
        name: format!("{weight}{suffix}"),
        dtype,
        shape,
        data,
    };
    let f32_bytes = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
    let mut parts = vec![
        part("", Dtype::U8, vec![w.packed.len(), 1], w.packed.to_vec()),
        part(".quant_map", Dtype::F32, vec![16], f32_bytes(&NF4_CODE)),
    ];
    match &*w.absmax {
        Absmax::F32(a) => parts.push(part(".absmax", Dtype::F32, vec![a.len()], f32_bytes(a))),
        Absmax::Nested { q, absmax2, code, .. } => parts.extend([
            part(".absmax", Dtype::U8, vec![q.len()], q.clone()),
            part(".nested_absmax", Dtype::F32, vec![absmax2.len()], f32_bytes(absmax2)),
            part(".nested_quant_map", Dtype::F32, vec![code.len()], f32_bytes(code)),
        ]),
    }
    let json = QuantState::of(w).to_json().into_bytes();
    parts.push(part(QUANT_STATE_NF4, Dtype::U8, vec![json.len()], json));
    parts
}

/// Counts of a written checkpoint, for the CLI's report and the bits-per-parameter accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QuantizeSummary {
    /// Tensors written.
    pub tensors: usize,
    /// Linear weights quantized, and their parameters.
    pub linears: usize,
    pub params: usize,
    /// Storage of those weights: packed nibbles, absmax (or its 8-bit codes, nested scales and the one f32
    /// offset); the code tables and the JSON are not counted (as `nf4::nf4_bits_per_param`).
    pub quantized_bytes: usize,
}

impl QuantizeSummary {
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.quantized_bytes as f64 / self.params.max(1) as f64
    }
}

/// Quantizes one decoder linear of `src` (f32, bf16 or f16, 2-D), naming it on any failure.
fn quantize_linear(src: &Checkpoint, name: &str, opts: QuantizeOptions) -> Result<Nf4Weight> {
    let w = src.load(name)?;
    if !NF4_SOURCE_DTYPES.contains(&w.dtype()) || w.shape().len() != 2 {
        return Err(src.tensor_error(
            name,
            format!(
                "{} {:?}: a linear weight to quantize must be 2-D F32, BF16 or F16 (is the model already quantized?)",
                w.dtype().safetensors_name(),
                w.shape()
            ),
        ));
    }
    Nf4Weight::quantize(&w, opts.blocksize, opts.double_quant).map_err(|e| src.tensor_error(name, e.to_string()))
}

/// Where a written tensor's bytes come from.
enum Source {
    /// Copied unchanged from the input tensor of the same name.
    Copy,
    /// Part of the quantized form of this input linear weight.
    Linear(String),
}

/// Writes every tensor of `src` as transformers + bitsandbytes save the 4-bit model: decoder linears
/// ([`is_decoder_linear`]) NF4-quantized with their quant state, every other tensor copied byte for byte; header
/// metadata `{"format": "pt"}`; safetensors' order (descending dtype, then name) and 8-byte header padding.
///
/// Streams: the header comes first and needs every tensor's size, and the quant-state JSON's size depends on the
/// nested offset, known only after quantizing. So a first pass quantizes each linear to measure it and drops it; the
/// second quantizes it again (deterministic, so the same bytes) and writes each part at its offset. Host memory stays
/// near one tensor. `dest` only names the output in errors.
pub fn write_quantized<W: Write + Seek>(
    src: &Checkpoint,
    opts: QuantizeOptions,
    out: &mut W,
    dest: &Path,
) -> Result<QuantizeSummary> {
    let mut summary = QuantizeSummary::default();
    let mut layout: Vec<(String, TensorInfo, Source)> = Vec::new();
    for name in src.names() {
        if is_decoder_linear(name) {
            let w = quantize_linear(src, name, opts)?;
            summary.linears += 1;
            summary.params += w.elem_count();
            summary.quantized_bytes += w.size_in_bytes();
            for p in linear_parts(name, &w) {
                let info = TensorInfo { dtype: p.dtype, shape: p.shape, data_offsets: (0, p.data.len()) };
                layout.push((p.name, info, Source::Linear(name.to_string())));
            }
        } else {
            let (dtype, shape) = src.info(name)?;
            // `info` spells the dtype as safetensors' enum variant, which is also its serialized name.
            let dtype: Dtype = serde_json::from_value(Value::String(dtype.clone()))
                .map_err(|_| src.tensor_error(name, format!("unknown safetensors dtype {dtype}")))?;
            let len = src.bytes(name)?.len();
            layout.push((name.to_string(), TensorInfo { dtype, shape, data_offsets: (0, len) }, Source::Copy));
        }
    }
    // safetensors' `prepare`: descending dtype (its enum order is by alignment), then name.
    layout.sort_by(|(a, ia, _), (b, ib, _)| ib.dtype.cmp(&ia.dtype).then_with(|| a.cmp(b)));
    let mut offset = 0;
    for (_, info, _) in &mut layout {
        let len = info.data_offsets.1;
        info.data_offsets = (offset, offset + len);
        offset += len;
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let entries: Vec<(String, TensorInfo)> = layout.iter().map(|(n, i, _)| (n.clone(), i.clone())).collect();
    let names: std::collections::HashSet<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    if names.len() != entries.len() {
        return Err(Error::Checkpoint {
            path: dest.into(),
            msg: "two tensors would share a name (does the input hold bitsandbytes tensors?)".into(),
        });
    }
    let metadata = Metadata::new(Some(metadata), entries)
        .map_err(|e| Error::Checkpoint { path: dest.into(), msg: format!("safetensors header: {e}") })?;
    let mut header = serde_json::to_string(&metadata)
        .map_err(|e| Error::Checkpoint { path: dest.into(), msg: format!("safetensors header: {e}") })?
        .into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let io = |e| Error::io(dest, e);
    out.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    out.write_all(&header).map_err(io)?;
    let data_start = 8 + header.len() as u64;

    let at: HashMap<&str, &TensorInfo> = layout.iter().map(|(n, i, _)| (n.as_str(), i)).collect();
    let mut put = |name: &str, data: &[u8]| -> Result<()> {
        let (start, end) = at[name].data_offsets;
        if end - start != data.len() {
            return Err(Error::Checkpoint {
                path: dest.into(),
                msg: format!("tensor {name}: quantizing again gave {} bytes, not {}", data.len(), end - start),
            });
        }
        out.seek(SeekFrom::Start(data_start + start as u64)).map_err(io)?;
        out.write_all(data).map_err(io)
    };
    for (name, _, source) in &layout {
        match source {
            Source::Copy => put(name, src.bytes(name)?)?,
            // All parts of a linear are written, each at its own offset, when its packed weight comes up.
            Source::Linear(weight) if name == weight => {
                for p in linear_parts(weight, &quantize_linear(src, weight, opts)?) {
                    put(&p.name, &p.data)?;
                }
            }
            Source::Linear(_) => {}
        }
    }
    out.flush().map_err(io)?;
    summary.tensors = layout.len();
    Ok(summary)
}

/// The config.json transformers writes for the quantized model: `source` (the input's config.json) plus
/// `quantization_config` as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", ...).to_dict()`,
/// serialized as `json.dumps(indent=2, sort_keys=True) + "\n"`. `path` names the source in errors.
pub fn quantized_config_json(source: &str, path: &Path, opts: QuantizeOptions) -> Result<String> {
    let mut config: Value = serde_json::from_str(source).map_err(|e| Error::json(path, &e))?;
    let Value::Object(map) = &mut config else {
        return Err(Error::config(path, "config.json", "is not a JSON object"));
    };
    if map.contains_key("quantization_config") {
        return Err(Error::config(path, "quantization_config", "the model is already quantized"));
    }
    if !NF4_SOURCE_DTYPES.contains(&opts.compute_dtype) {
        return Err(Error::config(path, "bnb_4bit_compute_dtype", "must be float32, bfloat16 or float16"));
    }
    let compute = torch_dtype_name(opts.compute_dtype);
    // `BitsAndBytesConfig.__dict__` (its private `_load_in_*` too) with the dtypes as strings, plus the
    // `load_in_4bit`/`load_in_8bit` properties; the defaults are transformers 5.17's.
    let quantization = serde_json::json!({
        "_load_in_4bit": true,
        "_load_in_8bit": false,
        "bnb_4bit_compute_dtype": compute,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": opts.double_quant,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": true,
        "load_in_8bit": false,
        "quant_method": "bitsandbytes",
    });
    map.insert("quantization_config".into(), quantization);
    Ok(py_json_pretty(&config) + "\n")
}
