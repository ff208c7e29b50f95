//! 4-bit checkpoints as transformers (5.17) and bitsandbytes (0.50.2) save them: reading a pre-quantized model's NF4
//! linears, and writing a whole Hugging Face checkpoint in that form, byte for byte as `save_pretrained` would.
//!
//! What decides every byte (design/FORMATS.md "4-bit checkpoints as transformers saves them"; REFERENCE.md §1, §2):
//! - bnb's `Linear4bit._save_to_state_dict` stores `{module}.weight` (the packed nibbles, u8 `[(n + 1) / 2, 1]`) and,
//!   under the prefix `{module}.weight.`, every item of `QuantState.as_dict(packed=True)`: `absmax` (f32 `[blocks]`,
//!   or u8 with double quantization), `quant_map` (f32 `[16]`), with double quantization `nested_absmax` (f32
//!   `[ceil(blocks / 256)]`) and `nested_quant_map` (f32 `[256]`), and `quant_state.bitsandbytes__nf4`: u8 holding
//!   `json.dumps` of the non-tensor items in `as_dict`'s order (`bitsandbytes/utils.py::pack_dict_to_tensor`).
//! - transformers quantizes every `nn.Linear` of the decoder layers; embeddings, norms and lm_head keep their dtype.
//! - `save_pretrained` writes one `model.safetensors` (its default shard size is 50 GB) with header metadata
//!   `{"format": "pt"}`, through safetensors' `serialize`: tensors sorted by descending dtype, then by name.
//! - config.json is `json.dumps(indent=2, sort_keys=True)` of the config, which gains `quantization_config`
//!   (`BitsAndBytesConfig.to_dict()`).
//!
//! This module owns those keys, the quant-state JSON and Python's float formatting; the numerics stay in
//! `qlora_kernels::nf4` and `qlora_runtime::quant`. It knows nothing of files beyond the checkpoint it reads and the
//! stream it writes (atomic publication is the caller's).

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use qlora_kernels::nf4::{self, NESTED_BLOCKSIZE, NF4_CODE};
use qlora_runtime::quant::{Absmax, Nf4Weight};
use qlora_runtime::DType;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde_json::Value;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

/// The packed quant state's key after `{module}.weight` (`"quant_state.bitsandbytes__" + quant_type`).
const QUANT_STATE_NF4: &str = ".quant_state.bitsandbytes__nf4";
const QUANT_STATE_FP4: &str = ".quant_state.bitsandbytes__fp4";

/// The keys bnb's `QuantState.from_dict` accepts inside the JSON (`valid_qs_keys` less the tensors).
const QUANT_STATE_KEYS: [&str; 7] =
    ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"];

/// Whether `name` is the weight of a linear layer transformers quantizes in a Llama or Gemma decoder:
/// `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight` or `model.layers.{i}.mlp.{gate,up,down}_proj.weight`.
pub fn is_decoder_linear(name: &str) -> bool {
    let Some((layer, module)) = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) else {
        return false;
    };
    !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && matches!(
            module,
            "self_attn.q_proj.weight"
                | "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.o_proj.weight"
                | "mlp.gate_proj.weight"
                | "mlp.up_proj.weight"
                | "mlp.down_proj.weight"
        )
}

// ---------------------------------------------------------------------------------------------------------------
// Python's JSON text
// ---------------------------------------------------------------------------------------------------------------

/// `repr(float)` as Python (and so `json.dumps`) writes it: the shortest digits that round-trip, positional when the
/// decimal exponent is in [−4, 16), else `d.ddde±XX` with at least two exponent digits; integral values keep `.0`;
/// non-finite values as `json.dumps` spells them (`NaN`, `Infinity`).
pub fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits as Python's repr, as `d.ddd e x`.
    let sci = format!("{:e}", v.abs());
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always writes an exponent");
    let exp: i32 = exp.parse().expect("{:e} writes an integer exponent");
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if v.is_sign_negative() { "-" } else { "" };
    if !(-4..16).contains(&exp) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{first}{frac}e{esign}{:02}", exp.abs());
    }
    if exp < 0 {
        return format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize));
    }
    let int_len = exp as usize + 1;
    if digits.len() <= int_len {
        format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
    } else {
        format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
    }
}

/// A JSON string as `json.dumps` writes it (`ensure_ascii=True`): `"` and `\` escaped, the usual short escapes, every
/// other character outside printable ASCII as `\uXXXX` (UTF-16 units, lower-case hex).
fn py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                for unit in c.encode_utf16(&mut [0u16; 2]) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// `json.dumps(v, indent=2, sort_keys=True)` (how transformers writes config.json, before its trailing newline).
/// Integers stay integers and floats keep Python's repr, so a config written by Python comes back unchanged.
pub fn py_json_pretty(v: &Value) -> String {
    fn dump(v: &Value, depth: usize, out: &mut String) {
        let pad = |out: &mut String, d: usize| out.extend(std::iter::repeat_n(' ', 2 * d));
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, f) => out.push_str(&py_float(f.unwrap_or(f64::NAN))),
            },
            Value::String(s) => py_str(s, out),
            Value::Array(items) if items.is_empty() => out.push_str("[]"),
            Value::Object(map) if map.is_empty() => out.push_str("{}"),
            Value::Array(items) => {
                out.push_str("[\n");
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(",\n");
                    }
                    pad(out, depth + 1);
                    dump(item, depth + 1, out);
                }
                out.push('\n');
                pad(out, depth);
                out.push(']');
            }
            Value::Object(map) => {
                // sort_keys: Python orders str keys by code point, which is UTF-8 byte order.
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push_str("{\n");
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(",\n");
                    }
                    pad(out, depth + 1);
                    py_str(key, out);
                    out.push_str(": ");
                    dump(&map[key], depth + 1, out);
                }
                out.push('\n');
                pad(out, depth);
                out.push('}');
            }
        }
    }
    let mut out = String::new();
    dump(v, 0, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------------------------
// The quant-state JSON
// ---------------------------------------------------------------------------------------------------------------

/// torch's name of a dtype as bnb writes it (`str(torch.float32).strip("torch.")`).
fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F64 => "float64",
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::I32 => "int32",
        DType::U8 => "uint8",
    }
}

/// The dtypes bitsandbytes NF4-quantizes from (its CUDA `quantize_4bit` takes no others).
const NF4_SOURCE_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn dtype_from_torch_name(s: &str) -> Option<DType> {
    NF4_SOURCE_DTYPES.into_iter().find(|&d| torch_dtype_name(d) == s)
}

/// The non-tensor part of an NF4 `QuantState`, stored as JSON in `{module}.weight.quant_state.bitsandbytes__nf4`.
/// `nested_blocksize` (256) and `nested_dtype` (float32) are fixed by bnb and implied by `nested_offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantState {
    pub blocksize: usize,
    /// The dtype the weight was quantized from and dequantizes to.
    pub dtype: DType,
    /// `[out, in]`.
    pub shape: Vec<usize>,
    /// The mean subtracted before nested quantization; present exactly with double quantization.
    pub nested_offset: Option<f32>,
}

impl QuantState {
    pub fn of(w: &Nf4Weight) -> Self {
        let nested_offset = match &*w.absmax {
            Absmax::Nested { offset, .. } => Some(*offset),
            Absmax::F32(_) => None,
        };
        QuantState { blocksize: w.blocksize, dtype: w.dtype, shape: w.shape.to_vec(), nested_offset }
    }

    /// The JSON exactly as bnb writes it: `json.dumps` (separators `", "` and `": "`) of `as_dict`'s items in their
    /// order; the offset is `offset.item()`, the f32 widened to a Python float.
    pub fn to_json(&self) -> String {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let dtype = torch_dtype_name(self.dtype);
        let mut s = format!(
            r#"{{"quant_type": "nf4", "blocksize": {}, "dtype": "{dtype}", "shape": [{}]"#,
            self.blocksize,
            shape.join(", ")
        );
        if let Some(offset) = self.nested_offset {
            let _ = write!(
                s,
                r#", "nested_blocksize": {NESTED_BLOCKSIZE}, "nested_dtype": "float32", "nested_offset": {}"#,
                py_float(offset as f64)
            );
        }
        s.push('}');
        s
    }

    /// Parses and checks the stored JSON. The message says what is wrong; the caller names the tensor.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("quant state JSON is malformed: {e}"))?;
        let Value::Object(map) = v else {
            return Err("quant state JSON is not an object".into());
        };
        if let Some(key) = map.keys().find(|k| !QUANT_STATE_KEYS.contains(&k.as_str())) {
            return Err(format!("quant state JSON has an unknown key {key:?}"));
        }
        let str_field = |key: &str| -> std::result::Result<&str, String> {
            map.get(key)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("quant state JSON: {key:?} missing or not a string"))
        };
        let uint_field = |key: &str| -> std::result::Result<usize, String> {
            map.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("quant state JSON: {key:?} missing or not a non-negative integer"))
        };
        match str_field("quant_type")? {
            "nf4" => {}
            "fp4" => return Err("quant_type \"fp4\" is not supported: only nf4 (bnb_4bit_quant_type=\"nf4\")".into()),
            other => return Err(format!("quant_type {other:?} is not supported: only nf4")),
        }
        let blocksize = uint_field("blocksize")?;
        if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
            return Err(format!("blocksize {blocksize} is not a power of two in 32..=4096 (bitsandbytes' range)"));
        }
        let dtype_name = str_field("dtype")?;
        let dtype = dtype_from_torch_name(dtype_name)
            .ok_or_else(|| format!("dtype {dtype_name:?} is not one NF4 quantizes (float32, bfloat16, float16)"))?;
        let shape = map
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect::<Option<Vec<_>>>()
            })
            .ok_or("quant state JSON: \"shape\" missing or not a list of sizes")?;
        let nested = ["nested_blocksize", "nested_dtype", "nested_offset"].map(|k| map.contains_key(k));
        let nested_offset = match nested {
            [false, false, false] => None,
            [true, true, true] => {
                let nested_blocksize = uint_field("nested_blocksize")?;
                if nested_blocksize != NESTED_BLOCKSIZE {
                    return Err(format!("nested_blocksize {nested_blocksize}, expected {NESTED_BLOCKSIZE}"));
                }
                let nested_dtype = str_field("nested_dtype")?;
                if nested_dtype != "float32" {
                    return Err(format!("nested_dtype {nested_dtype:?}, expected \"float32\""));
                }
                // bnb restores it with `torch.tensor(float(v))`: the f32 nearest to the stored number.
                let offset =
                    map["nested_offset"].as_f64().ok_or("quant state JSON: \"nested_offset\" is not a number")?;
                Some(offset as f32)
            }
            _ => return Err("quant state JSON has some but not all of the nested_* keys".into()),
        };
        Ok(QuantState { blocksize, dtype, shape, nested_offset })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------------------------

/// A tensor's stored bytes after checking its dtype and shape, naming the tensor (and its file) when they differ.
fn checked_bytes<'a>(ck: &'a Checkpoint, name: &str, dtype: DType, shape: &[usize]) -> Result<&'a [u8]> {
    let (stored, stored_shape) = ck.info(name)?;
    if stored != dtype.safetensors_name() || stored_shape != shape {
        return Err(ck.tensor_error(
            name,
            format!(
                "{stored} {stored_shape:?}, expected {} {shape:?} for a bitsandbytes 4-bit weight",
                dtype.safetensors_name()
            ),
        ));
    }
    ck.bytes(name)
}

/// [`checked_bytes`] of an F32 tensor, as values (safetensors is little-endian, as every supported host).
fn checked_f32s(ck: &Checkpoint, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    Ok(bytemuck::pod_collect_to_vec(checked_bytes(ck, name, DType::F32, shape)?))
}

/// The NF4 weight of linear `module` (e.g. `model.layers.0.self_attn.q_proj`, `[out, in]` = `shape`) when the
/// checkpoint holds it as bitsandbytes serializes a 4-bit linear; `None` when `{module}.weight` is a plain tensor.
/// Every tensor and the quant-state JSON are checked against each other and against `shape`; bnb's other formats
/// (fp4, 8-bit LLM.int8, a `quant_storage` other than uint8) are refused by name.
pub fn load_linear(ck: &Checkpoint, module: &str, shape: [usize; 2]) -> Result<Option<Nf4Weight>> {
    let weight = format!("{module}.weight");
    let state_name = format!("{weight}{QUANT_STATE_NF4}");
    if !ck.contains(&state_name) {
        let fp4 = format!("{weight}{QUANT_STATE_FP4}");
        if ck.contains(&fp4) {
            return Err(ck.tensor_error(&fp4, "bitsandbytes fp4 weights are not supported: only nf4"));
        }
        let scb = format!("{module}.SCB");
        if ck.contains(&scb) {
            return Err(
                ck.tensor_error(&scb, "bitsandbytes 8-bit (LLM.int8) weights are not supported: only 4-bit nf4")
            );
        }
        return Ok(None);
    }
    let (stored, state_shape) = ck.info(&state_name)?;
    if stored != "U8" || state_shape.len() != 1 {
        return Err(ck.tensor_error(&state_name, format!("{stored} {state_shape:?}, expected a 1-D U8 tensor of JSON")));
    }
    let state = QuantState::parse(ck.bytes(&state_name)?).map_err(|msg| ck.tensor_error(&state_name, msg))?;
    if state.shape != shape {
        return Err(
            ck.tensor_error(&state_name, format!("shape {:?}, expected {shape:?} from config.json", state.shape))
        );
    }
    let n = shape[0] * shape[1];
    let blocks = nf4::nf4_num_blocks(n, state.blocksize);

    let (stored, _) = ck.info(&weight)?;
    if stored != "U8" {
        return Err(ck.tensor_error(
            &weight,
            format!("packed 4-bit data stored as {stored}: only bnb_4bit_quant_storage=uint8 is supported"),
        ));
    }
    let packed = checked_bytes(ck, &weight, DType::U8, &[nf4::nf4_packed_len(n), 1])?.to_vec();
    let quant_map_name = format!("{weight}.quant_map");
    let quant_map = checked_f32s(ck, &quant_map_name, &[16])?;
    // Dequantization uses the NF4 code itself, so a different map (fp4, custom) must not pass silently.
    if quant_map.iter().zip(&NF4_CODE).any(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err(ck.tensor_error(&quant_map_name, "is not the NF4 code (bitsandbytes' get_4bit_type(\"nf4\"))"));
    }
    let absmax_name = format!("{weight}.absmax");
    let absmax = match state.nested_offset {
        None => Absmax::F32(checked_f32s(ck, &absmax_name, &[blocks])?),
        Some(offset) => {
            let q = checked_bytes(ck, &absmax_name, DType::U8, &[blocks])?.to_vec();
            let absmax2_name = format!("{weight}.nested_absmax");
            let absmax2 = checked_f32s(ck, &absmax2_name, &[blocks.div_ceil(NESTED_BLOCKSIZE)])?;
            let code = checked_f32s(ck, &format!("{weight}.nested_quant_map"), &[256])?;
            Absmax::Nested { q, absmax2, offset, code }
        }
    };
    Ok(Some(Nf4Weight {
        shape,
        blocksize: state.blocksize,
        dtype: state.dtype,
        packed: Arc::new(packed),
        absmax: Arc::new(absmax),
        device: None,
    }))
}

// ---------------------------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------------------------

/// How `qlora-rt quantize` quantizes (transformers' `BitsAndBytesConfig` with nf4).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QuantizeOptions {
    pub blocksize: usize,
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`, recorded in config.json only (it does not change the stored bytes).
    pub compute_dtype: DType,
}

/// One stored tensor of a quantized linear: name, dtype, shape, bytes.
struct Part {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The tensors bnb's `_save_to_state_dict` writes for one 4-bit linear, `weight` being `{module}.weight`.
fn linear_parts(weight: &str, w: &Nf4Weight) -> Vec<Part> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::{BaseFormat, CausalLm};
    use qlora_kernels::Rng;
    use qlora_runtime::quant::BaseWeight;
    use qlora_runtime::Tensor;
    use safetensors::tensor::TensorView;
    use std::io::Cursor;
    use std::path::PathBuf;

    /// (name, dtype, shape, bytes) of a tensor to store.
    type Stored = (String, Dtype, Vec<usize>, Vec<u8>);

    fn stored(name: &str, t: &Tensor) -> Stored {
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (Dtype::F32, bytemuck::cast_slice(&t.values::<f32>()).to_vec()),
            DType::BF16 => (Dtype::BF16, bytemuck::cast_slice(&t.values::<half::bf16>()).to_vec()),
            other => panic!("test tensors are f32 or bf16, not {other:?}"),
        };
        (name.into(), dtype, t.shape().to_vec(), bytes)
    }

    /// The bytes safetensors' own serializer writes for these tensors, with transformers' metadata.
    fn serialize(tensors: &[Stored]) -> Vec<u8> {
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).expect("consistent test tensor")))
            .collect();
        safetensors::serialize(views, Some(HashMap::from([("format".into(), "pt".into())]))).unwrap()
    }

    fn checkpoint(dir: &Path, tensors: &[Stored]) -> Checkpoint {
        let path = dir.join("model.safetensors");
        std::fs::write(&path, serialize(tensors)).unwrap();
        Checkpoint::from_files(&[path]).unwrap()
    }

    const OPTS: QuantizeOptions = QuantizeOptions { blocksize: 64, double_quant: true, compute_dtype: DType::F32 };

    #[test]
    fn py_float_is_python_repr() {
        // An f32 offset widened, as `offset.item()` gives it to json.dumps.
        let f32_offset = f32::from_bits(0x3f06_7b36) as f64;
        for (v, py) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-6, "1e-06"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.5, "123456789.5"),
            (1.5e-7, "1.5e-07"),
            (2.5e100, "2.5e+100"),
            (-3.25, "-3.25"),
            (10000.0, "10000.0"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (0.00012345, "0.00012345"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (f32_offset, "0.5253175497055054"),
            (f64::NAN, "NaN"),
            (f64::NEG_INFINITY, "-Infinity"),
        ] {
            assert_eq!(py_float(v), py, "{v:e}");
        }
    }

    #[test]
    fn pretty_json_is_json_dumps_indent_2_sort_keys() {
        let v: Value = serde_json::from_str(
            r#"{"b":[1,2.5,{"z":null,"a":true}],"a":"é☃😀\"\\\n\u0001\u007f","e":[],"d":{},"c":1e-06,"n":-7}"#,
        )
        .unwrap();
        // Python 3: json.dumps(v, indent=2, sort_keys=True) of the same object.
        let python = r#"{
  "a": "\u00e9\u2603\ud83d\ude00\"\\\n\u0001\u007f",
  "b": [
    1,
    2.5,
    {
      "a": true,
      "z": null
    }
  ],
  "c": 1e-06,
  "d": {},
  "e": [],
  "n": -7
}"#;
        assert_eq!(py_json_pretty(&v), python);
    }

    #[test]
    fn quant_state_json_is_what_bnb_writes() {
        let state = QuantState {
            blocksize: 64,
            dtype: DType::F32,
            shape: vec![96, 96],
            nested_offset: Some(f32::from_bits(0x3f06_7b36)),
        };
        let json = state.to_json();
        assert_eq!(
            json,
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [96, 96], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5253175497055054}"#
        );
        assert_eq!(QuantState::parse(json.as_bytes()).unwrap(), state);
        let plain = QuantState { blocksize: 128, dtype: DType::BF16, shape: vec![8, 4], nested_offset: None };
        assert_eq!(plain.to_json(), r#"{"quant_type": "nf4", "blocksize": 128, "dtype": "bfloat16", "shape": [8, 4]}"#);
        assert_eq!(QuantState::parse(plain.to_json().as_bytes()).unwrap(), plain);
    }

    #[test]
    fn quant_state_json_errors_say_what_is_wrong() {
        let good = r#""quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2, 64]"#;
        for (json, expected) in [
            ("{\"quant_type\": ".to_string(), "malformed"),
            ("[1, 2]".into(), "not an object"),
            (format!("{{{good}, \"extra\": 1}}"), "unknown key \"extra\""),
            (format!("{{{}}}", good.replace("\"nf4\"", "\"fp4\"")), "fp4\" is not supported"),
            (format!("{{{}}}", good.replace("64,", "48,")), "blocksize 48 is not a power of two"),
            (format!("{{{}}}", good.replace("float16", "int8")), "dtype \"int8\""),
            (format!("{{{}}}", good.replace("[2, 64]", "null")), "\"shape\" missing"),
            (format!("{{{good}, \"nested_offset\": 0.5}}"), "some but not all"),
            (
                format!("{{{good}, \"nested_blocksize\": 128, \"nested_dtype\": \"float32\", \"nested_offset\": 0.5}}"),
                "nested_blocksize 128",
            ),
        ] {
            let err = QuantState::parse(json.as_bytes()).unwrap_err();
            assert!(err.contains(expected), "{json}: {err}");
        }
    }

    /// A small Llama-named checkpoint: bf16 embeddings, f32 norms, and linears of awkward sizes (a partial last
    /// block, an odd element count) in f32 and bf16.
    fn source_tensors() -> Vec<Stored> {
        let mut rng = Rng::new(7);
        let mut t = |shape: &[usize], dtype| Tensor::randn(shape, 0.05, dtype, &mut rng);
        vec![
            stored("model.embed_tokens.weight", &t(&[11, 64], DType::BF16)),
            stored("model.layers.0.input_layernorm.weight", &t(&[64], DType::F32)),
            stored("model.layers.0.self_attn.q_proj.weight", &t(&[64, 64], DType::F32)),
            stored("model.layers.0.self_attn.k_proj.weight", &t(&[33, 64], DType::BF16)),
            stored("model.layers.0.mlp.down_proj.weight", &t(&[3, 7], DType::F32)),
            stored("model.layers.12.mlp.up_proj.weight", &t(&[130, 129], DType::F32)),
            stored("lm_head.weight", &t(&[11, 64], DType::F32)),
        ]
    }

    #[test]
    fn streamed_file_is_safetensors_own_serialization_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let source = source_tensors();
        let src = checkpoint(dir.path(), &source);
        for (double_quant, blocksize) in [(false, 64), (true, 64), (true, 128), (false, 32)] {
            let opts = QuantizeOptions { blocksize, double_quant, ..OPTS };
            let mut expected: Vec<Stored> = Vec::new();
            let mut weights = Vec::new();
            for (name, ..) in &source {
                if is_decoder_linear(name) {
                    let w = Nf4Weight::quantize(&src.load(name).unwrap(), blocksize, double_quant).unwrap();
                    expected.extend(linear_parts(name, &w).into_iter().map(|p| (p.name, p.dtype, p.shape, p.data)));
                    weights.push((name.strip_suffix(".weight").unwrap().to_string(), w));
                } else {
                    expected.push(source.iter().find(|s| &s.0 == name).unwrap().clone());
                }
            }
            let mut out = Cursor::new(Vec::new());
            let summary = write_quantized(&src, opts, &mut out, Path::new("out")).unwrap();
            assert!(out.get_ref() == &serialize(&expected), "dq {double_quant}, block {blocksize}: bytes differ");
            assert_eq!((summary.tensors, summary.linears), (expected.len(), 4));
            assert_eq!(summary.params, 64 * 64 + 33 * 64 + 3 * 7 + 130 * 129);
            assert_eq!(summary.quantized_bytes, weights.iter().map(|(_, w)| w.size_in_bytes()).sum::<usize>());

            let qdir = tempfile::tempdir().unwrap();
            std::fs::write(qdir.path().join("model.safetensors"), out.into_inner()).unwrap();
            let ck = Checkpoint::open(qdir.path()).unwrap();
            for (module, w) in &weights {
                assert_eq!(load_linear(&ck, module, w.shape).unwrap().as_ref(), Some(w), "{module}");
            }
            assert!(load_linear(&src, "model.layers.0.self_attn.q_proj", [64, 64]).unwrap().is_none());
        }
    }

    /// One double-quantized linear `m.weight` [4, 64] as bnb stores it, for damaging.
    fn linear_file() -> Vec<Stored> {
        let w = Tensor::randn(&[4, 64], 0.05, DType::F32, &mut Rng::new(3));
        let w = Nf4Weight::quantize(&w, 64, true).unwrap();
        linear_parts("m.weight", &w).into_iter().map(|p| (p.name, p.dtype, p.shape, p.data)).collect()
    }

    fn load_error(tensors: &[Stored]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let ck = checkpoint(dir.path(), tensors);
        let err = load_linear(&ck, "m", [4, 64]).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "names the file: {err}");
        err
    }

    fn replace(tensors: &[Stored], name: &str, f: impl Fn(&mut Stored)) -> Vec<Stored> {
        let mut out = tensors.to_vec();
        f(out.iter_mut().find(|t| t.0 == name).expect("tensor to damage"));
        out
    }

    #[test]
    fn damaged_4bit_weights_are_refused_naming_the_tensor() {
        let good = linear_file();
        let state = "m.weight.quant_state.bitsandbytes__nf4";
        let json = |s: &str| {
            replace(&good, state, |t| {
                t.3 = s.as_bytes().to_vec();
                t.2 = vec![t.3.len()];
            })
        };
        let original = String::from_utf8(good.iter().find(|t| t.0 == state).unwrap().3.clone()).unwrap();
        let cases: Vec<(Vec<Stored>, &str)> = vec![
            (
                json(&original.replace("[4, 64]", "[64, 4]")),
                "tensor m.weight.quant_state.bitsandbytes__nf4: shape [64, 4]",
            ),
            (json(&original[..20]), "quant state JSON is malformed"),
            (json(&original.replace("\"blocksize\": 64", "\"blocksize\": 65")), "blocksize 65"),
            (
                replace(&good, state, |t| t.0 = "m.weight.quant_state.bitsandbytes__fp4".into()),
                "tensor m.weight.quant_state.bitsandbytes__fp4: bitsandbytes fp4 weights are not supported",
            ),
            (replace(&good, "m.weight.absmax", |t| t.1 = Dtype::I8), "tensor m.weight.absmax: I8 [4], expected U8 [4]"),
            (
                replace(&good, "m.weight.absmax", |t| {
                    t.1 = Dtype::F32;
                    t.2 = vec![1];
                }),
                "tensor m.weight.absmax: F32 [1], expected U8 [4]",
            ),
            (
                replace(&good, "m.weight", |t| {
                    t.1 = Dtype::BF16;
                    t.2 = vec![64, 1];
                }),
                "tensor m.weight: packed 4-bit data stored as BF16",
            ),
            (replace(&good, "m.weight", |t| t.2 = vec![1, 128]), "tensor m.weight: U8 [1, 128], expected U8 [128, 1]"),
            (replace(&good, "m.weight.quant_map", |t| t.3[0] ^= 1), "tensor m.weight.quant_map: is not the NF4 code"),
            (
                good.iter().filter(|t| t.0 != "m.weight.nested_absmax").cloned().collect(),
                "tensor m.weight.nested_absmax: missing",
            ),
        ];
        for (tensors, expected) in cases {
            let err = load_error(&tensors);
            assert!(err.contains(expected), "expected {expected:?} in: {err}");
        }
        let int8 = vec![
            ("m.weight".into(), Dtype::I8, vec![4, 64], vec![0; 256]),
            ("m.SCB".into(), Dtype::F32, vec![4], vec![0; 16]),
        ];
        assert!(load_error(&int8).contains("tensor m.SCB: bitsandbytes 8-bit (LLM.int8) weights are not supported"));
    }

    #[test]
    fn quantizing_refuses_an_already_quantized_model() {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = linear_file();
        tensors.iter_mut().for_each(|t| t.0 = t.0.replace("m.weight", "model.layers.0.mlp.up_proj.weight"));
        let src = checkpoint(dir.path(), &tensors);
        let err = write_quantized(&src, OPTS, &mut Cursor::new(Vec::new()), Path::new("out")).unwrap_err().to_string();
        assert!(
            err.contains("tensor model.layers.0.mlp.up_proj.weight: U8 [128, 1]") && err.contains("already"),
            "{err}"
        );
    }

    fn llama_config() -> Value {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama/config.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn config_gains_transformers_quantization_config() {
        let source = serde_json::to_string(&llama_config()).unwrap();
        let text = quantized_config_json(&source, Path::new("config.json"), OPTS).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let q = &v["quantization_config"];
        assert_eq!((q["quant_method"].as_str(), q["load_in_4bit"].as_bool()), (Some("bitsandbytes"), Some(true)));
        assert_eq!(q["bnb_4bit_use_double_quant"], Value::Bool(true));
        assert_eq!(v["rms_norm_eps"], llama_config()["rms_norm_eps"], "other fields unchanged");
        assert!(text.ends_with("}\n") && text.contains("\n  \"quantization_config\": {\n    \"_load_in_4bit\": true,"));
        let again = quantized_config_json(&text, Path::new("q/config.json"), OPTS).unwrap_err().to_string();
        assert!(again.contains("q/config.json: quantization_config: the model is already quantized"), "{again}");
    }

    /// The QLoRA paper's accounting on a model whose every linear has at least 256 NF4 blocks: 4 + 32/64 = 4.5 bits
    /// per parameter without double quantization, 4 + 8/64 + 32/(64·256) ≈ 4.127 with it; and the loaded model
    /// holds exactly the bytes the file stores.
    #[test]
    fn bits_per_param_on_a_quantized_model() {
        let mut config = llama_config();
        for (key, value) in
            [("hidden_size", 256), ("intermediate_size", 512), ("head_dim", 64), ("num_hidden_layers", 1)]
        {
            config[key] = value.into();
        }
        let (h, i, kv, v) = (256, 512, 128, 101);
        let mut rng = Rng::new(11);
        let mut t = |name: &str, shape: &[usize]| stored(name, &Tensor::randn(shape, 0.02, DType::F32, &mut rng));
        let p = "model.layers.0";
        let source = vec![
            t("model.embed_tokens.weight", &[v, h]),
            t("lm_head.weight", &[v, h]),
            t("model.norm.weight", &[h]),
            t(&format!("{p}.input_layernorm.weight"), &[h]),
            t(&format!("{p}.post_attention_layernorm.weight"), &[h]),
            t(&format!("{p}.self_attn.q_proj.weight"), &[h, h]),
            t(&format!("{p}.self_attn.k_proj.weight"), &[kv, h]),
            t(&format!("{p}.self_attn.v_proj.weight"), &[kv, h]),
            t(&format!("{p}.self_attn.o_proj.weight"), &[h, h]),
            t(&format!("{p}.mlp.gate_proj.weight"), &[i, h]),
            t(&format!("{p}.mlp.up_proj.weight"), &[i, h]),
            t(&format!("{p}.mlp.down_proj.weight"), &[h, i]),
        ];
        let dir = tempfile::tempdir().unwrap();
        let src = checkpoint(dir.path(), &source);
        for (double_quant, bits) in [(true, 4.127), (false, 4.5)] {
            let out = tempfile::tempdir().unwrap();
            let mut file = std::fs::File::create(out.path().join("model.safetensors")).unwrap();
            let summary =
                write_quantized(&src, QuantizeOptions { double_quant, ..OPTS }, &mut file, out.path()).unwrap();
            drop(file);
            assert_eq!((summary.linears, summary.params), (7, 2 * h * h + 2 * kv * h + 3 * i * h));
            assert_eq!((summary.bits_per_param() * 1000.0).round() / 1000.0, bits, "{}", summary.bits_per_param());
            std::fs::write(out.path().join("config.json"), config.to_string()).unwrap();
            // The file's quantization wins over the format asked for: no requantization.
            let asked = BaseFormat::Nf4 { blocksize: 128, double_quant: !double_quant };
            let model = CausalLm::load(out.path(), asked).unwrap();
            let mut held = 0;
            for proj in model.projections() {
                let BaseWeight::Nf4(w) = &proj.base else { panic!("{} is not NF4", proj.name) };
                assert_eq!((w.blocksize, matches!(*w.absmax, Absmax::Nested { .. })), (64, double_quant));
                assert_eq!(w.bits_per_param(), nf4::nf4_bits_per_param(w.elem_count(), 64, double_quant));
                held += w.size_in_bytes();
            }
            assert_eq!(held, summary.quantized_bytes);
        }
    }
}
