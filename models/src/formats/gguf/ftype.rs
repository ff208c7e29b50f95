//! The file types `export-gguf --type` writes and, for each, the ggml type of every tensor as llama.cpp chooses
//! it: `convert_hf_to_gguf.py --outtype f32|f16` for the float types, and llama-quantize's mix
//! (`llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp, without an importance matrix or overrides) for
//! the quantized ones:
//! - the output matrix, and the token embedding when it is shared with the output, is Q6_K (Q8_0 when the file
//!   type is Q8_0, or when its rows are not whole blocks of the file type's base type);
//! - for Q4_K_M and Q5_K_M, `attn_v` and `ffn_down` of the first and last eighth of the layers and of every third
//!   layer between are Q6_K (`use_more_bits`); a Llama 70B (80 layers, grouped KV heads) has Q4_K `attn_v` raised
//!   to Q5_K;
//! - a matrix whose rows are not whole blocks falls back: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and to F16
//!   when even 32-value blocks do not divide its rows (`tensor_type_fallback`);
//! - 1-D tensors (norms, rope factors) stay F32.

use super::dequant::GgmlType;

/// A GGUF file type (llama.cpp's `llama_ftype`, the value of `general.file_type`).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q4_K_M,
    Q5_K_M,
    Q6_K,
}

/// What the mix reads of the model besides a tensor's name and shape.
#[derive(Clone, Copy, Debug)]
pub struct MixModel {
    pub layers: usize,
    /// The token embedding doubles as the output matrix (no `output.weight`).
    pub tied: bool,
    /// llama.cpp's `LLM_TYPE_70B`: a Llama with 80 layers and fewer KV heads than heads.
    pub llama_70b: bool,
}

impl FileType {
    /// `general.file_type` (`LLAMA_FTYPE_*`).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q4_K_M => 15,
            FileType::Q5_K_M => 17,
            FileType::Q6_K => 18,
        }
    }

    /// Whether llama-quantize makes this type (the float ones come from the converter).
    pub fn is_quantized(self) -> bool {
        !matches!(self, FileType::F32 | FileType::F16)
    }

    /// The type of every matrix the mix does not single out.
    fn base(self) -> GgmlType {
        match self {
            FileType::F32 => GgmlType::F32,
            FileType::F16 => GgmlType::F16,
            FileType::Q8_0 => GgmlType::Q8_0,
            FileType::Q4_0 => GgmlType::Q4_0,
            FileType::Q4_1 => GgmlType::Q4_1,
            FileType::Q4_K_M => GgmlType::Q4_K,
            FileType::Q5_K_M => GgmlType::Q5_K,
            FileType::Q6_K => GgmlType::Q6_K,
        }
    }

    /// The ggml type of the tensor named `name` (llama.cpp's name) with shape `dims`, outermost first (a matrix
    /// is `[rows, row length]`).
    pub fn tensor_type(self, model: &MixModel, name: &str, dims: &[usize]) -> GgmlType {
        let base = self.base();
        let &[_, cols] = dims else { return GgmlType::F32 };
        if !self.is_quantized() {
            return base;
        }
        let more_bits = |layer: usize| {
            let n = model.layers;
            // `||` short-circuits: the subtraction runs only once layer ≥ n / 8.
            layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2
        };
        let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
        let k_m = matches!(self, FileType::Q4_K_M | FileType::Q5_K_M);
        let mut ty = base;
        if name == "output.weight" || (model.tied && name == "token_embd.weight") {
            ty = if cols % base.block_size() != 0 || base == GgmlType::Q8_0 { GgmlType::Q8_0 } else { GgmlType::Q6_K };
        } else if name.ends_with(".attn_v.weight") {
            if k_m && layer.is_some_and(more_bits) {
                ty = GgmlType::Q6_K;
            }
            if model.llama_70b && ty == GgmlType::Q4_K {
                ty = GgmlType::Q5_K;
            }
        } else if name.ends_with(".ffn_down.weight") && k_m && layer.is_some_and(more_bits) {
            ty = GgmlType::Q6_K;
        }
        fallback(ty, cols)
    }
}

/// `tensor_type_fallback`: a type whose blocks divide a row of `cols` values.
fn fallback(ty: GgmlType, cols: usize) -> GgmlType {
    if cols % ty.block_size() == 0 {
        return ty;
    }
    let smaller = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if cols % smaller.block_size() == 0 {
        smaller
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgmlType::*;

    /// The types of one layer's q, v, down and the embedding, for a model of `layers` layers.
    fn mix(ft: FileType, m: &MixModel, hidden: usize, ffn: usize, layer: usize) -> [GgmlType; 4] {
        [
            ft.tensor_type(m, &format!("blk.{layer}.attn_q.weight"), &[hidden, hidden]),
            ft.tensor_type(m, &format!("blk.{layer}.attn_v.weight"), &[hidden / 4, hidden]),
            ft.tensor_type(m, &format!("blk.{layer}.ffn_down.weight"), &[hidden, ffn]),
            ft.tensor_type(m, "token_embd.weight", &[1000, hidden]),
        ]
    }

    #[test]
    fn k_m_raises_the_sensitive_layers() {
        let m = MixModel { layers: 32, tied: false, llama_70b: false };
        // 32 layers: 0-3 and 28-31 get more bits, and 4 + 3k + 2 between (6, 9, ..., 27).
        let raised: Vec<usize> = (0..32).filter(|&i| mix(FileType::Q4_K_M, &m, 4096, 14336, i)[1] == Q6_K).collect();
        assert_eq!(raised, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        assert_eq!(mix(FileType::Q4_K_M, &m, 4096, 14336, 4), [Q4_K, Q4_K, Q4_K, Q4_K]);
        assert_eq!(mix(FileType::Q5_K_M, &m, 4096, 14336, 0), [Q5_K, Q6_K, Q6_K, Q5_K]);
        assert_eq!(mix(FileType::Q6_K, &m, 4096, 14336, 0), [Q6_K; 4]);
        assert_eq!(FileType::Q4_K_M.tensor_type(&m, "output.weight", &[1000, 4096]), Q6_K);
        assert_eq!(FileType::Q8_0.tensor_type(&m, "output.weight", &[1000, 4096]), Q8_0);
        assert_eq!(FileType::Q4_0.tensor_type(&m, "output.weight", &[1000, 4096]), Q6_K);
        assert_eq!(FileType::Q4_0.tensor_type(&m, "output_norm.weight", &[4096]), F32);
        let m70 = MixModel { layers: 80, tied: false, llama_70b: true };
        assert_eq!(mix(FileType::Q4_K_M, &m70, 8192, 28672, 11), [Q4_K, Q5_K, Q4_K, Q4_K]);
    }

    #[test]
    fn tied_embeddings_and_odd_rows_fall_back() {
        // SmolLM2-135M: hidden 576 is whole 32-blocks but not 256-blocks; the tied embedding is Q8_0 at every
        // quantized type, as in llama.cpp's own SmolLM2 files.
        let m = MixModel { layers: 30, tied: true, llama_70b: false };
        assert_eq!(mix(FileType::Q4_K_M, &m, 576, 1536, 0), [Q5_0, Q8_0, Q6_K, Q8_0]);
        assert_eq!(mix(FileType::Q4_K_M, &m, 576, 1536, 4), [Q5_0, Q5_0, Q4_K, Q8_0]);
        assert_eq!(mix(FileType::Q5_K_M, &m, 576, 1536, 4), [Q5_1, Q5_1, Q5_K, Q8_0]);
        assert_eq!(mix(FileType::Q6_K, &m, 576, 1536, 5), [Q8_0, Q8_0, Q6_K, Q8_0]);
        assert_eq!(mix(FileType::Q4_0, &m, 576, 1536, 5), [Q4_0, Q4_0, Q4_0, Q8_0]);
        // Untied, the embedding keeps the file's base type.
        let untied = MixModel { tied: false, ..m };
        assert_eq!(mix(FileType::Q4_1, &untied, 512, 1536, 5)[3], Q4_1);
        // Rows that are not whole 32-value blocks are F16 at every quantized type.
        assert_eq!(mix(FileType::Q6_K, &m, 48, 1536, 5)[0], F16);
        assert_eq!(FileType::F16.tensor_type(&m, "token_embd.weight", &[10, 48]), F16);
        assert_eq!(FileType::F32.tensor_type(&m, "blk.0.attn_q.weight", &[48, 48]), F32);
    }
}
