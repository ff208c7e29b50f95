//! Reading a pre-quantized linear as bitsandbytes stored it, every tensor and the quant state checked against each
//! other.

use super::{QuantState, QUANT_STATE_FP4, QUANT_STATE_NF4};
use crate::error::Result;
use crate::formats::checkpoint::Checkpoint;
use qlora_runtime::nf4::{self, NESTED_BLOCKSIZE, NF4_CODE};
use qlora_runtime::quant::{Absmax, Nf4Weight};
use qlora_runtime::DType;
use std::sync::Arc;

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
