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
//! This module owns those keys and the quant-state JSON; `python` holds Python's float and JSON formatting, `read`
//! and `write` the two directions. The numerics stay in `qlora_kernels::nf4` and `qlora_runtime::quant`. It knows
//! nothing of files beyond the checkpoint it reads and the stream it writes (atomic publication is the caller's).

mod python;
mod read;
mod write;

#[cfg(test)]
mod tests;

pub use python::{py_float, py_json_pretty};
pub use read::load_linear;
pub use write::{quantized_config_json, write_quantized, QuantizeOptions, QuantizeSummary};

use crate::config::PROJECTIONS;
use python::torch_dtype_name;
use qlora_runtime::nf4::NESTED_BLOCKSIZE;
use qlora_runtime::quant::{Absmax, Nf4Weight};
use qlora_runtime::DType;
use serde_json::Value;
use std::fmt::Write as _;

/// The packed quant state's key after `{module}.weight` (`"quant_state.bitsandbytes__" + quant_type`).
const QUANT_STATE_NF4: &str = ".quant_state.bitsandbytes__nf4";
const QUANT_STATE_FP4: &str = ".quant_state.bitsandbytes__fp4";

/// The keys bnb's `QuantState.from_dict` accepts inside the JSON (`valid_qs_keys` less the tensors).
const QUANT_STATE_KEYS: [&str; 7] =
    ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"];

/// Whether `name` is the weight of a linear layer transformers quantizes in a Llama or Gemma decoder:
/// `model.layers.{i}.{module}.weight` with `module` one of [`PROJECTIONS`].
pub fn is_decoder_linear(name: &str) -> bool {
    let Some((layer, module)) = name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) else {
        return false;
    };
    !layer.is_empty()
        && layer.bytes().all(|b| b.is_ascii_digit())
        && module.strip_suffix(".weight").is_some_and(|m| PROJECTIONS.contains(&m))
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
