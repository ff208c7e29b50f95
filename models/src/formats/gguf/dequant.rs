//! ggml tensor types and their dequantization to f32 on the CPU, in parallel over groups of blocks.
//!
//! Type ids and (values per block, bytes per block) are gguf-py's `GGMLQuantizationType` and
//! `GGML_QUANT_SIZES`; block layouts are ggml's `block_q*` structs in `ggml-common.h`, and the arithmetic
//! follows gguf-py's numpy `dequantize_blocks` operation for operation (products and sums in f32, in the same
//! order, no fused multiply-add), so results are bit-identical to `gguf.quants.dequantize`. Every multi-byte
//! field is little-endian; `d`/`dmin` scales are f16.

use rayon::prelude::*;

/// Values per K-quant super-block (`QK_K`).
const QK_K: usize = 256;

macro_rules! ggml_types {
    ($($name:ident = $id:literal, $block:literal, $bytes:expr;)*) => {
        /// A ggml tensor type: every type a GGUF file may name, whether or not it can be dequantized here.
        /// The discriminant is the type id.
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum GgmlType { $($name = $id,)* }

        impl GgmlType {
            pub fn from_id(id: u32) -> Option<Self> {
                match id { $($id => Some(GgmlType::$name),)* _ => None }
            }

            pub fn name(self) -> &'static str {
                match self { $(GgmlType::$name => stringify!($name),)* }
            }

            /// Values per block.
            pub fn block_size(self) -> usize {
                match self { $(GgmlType::$name => $block,)* }
            }

            /// Bytes per block.
            pub fn type_size(self) -> usize {
                match self { $(GgmlType::$name => $bytes,)* }
            }
        }
    };
}

ggml_types! {
    F32 = 0, 1, 4;
    F16 = 1, 1, 2;
    Q4_0 = 2, 32, 2 + 16;
    Q4_1 = 3, 32, 2 + 2 + 16;
    Q5_0 = 6, 32, 2 + 4 + 16;
    Q5_1 = 7, 32, 2 + 2 + 4 + 16;
    Q8_0 = 8, 32, 2 + 32;
    Q8_1 = 9, 32, 4 + 4 + 32;
    Q2_K = 10, 256, 2 + 2 + QK_K / 16 + QK_K / 4;
    Q3_K = 11, 256, 2 + QK_K / 4 + QK_K / 8 + 12;
    Q4_K = 12, 256, 2 + 2 + QK_K / 2 + 12;
    Q5_K = 13, 256, 2 + 2 + QK_K / 2 + QK_K / 8 + 12;
    Q6_K = 14, 256, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16;
    Q8_K = 15, 256, 4 + QK_K + QK_K / 8;
    IQ2_XXS = 16, 256, 2 + QK_K / 4;
    IQ2_XS = 17, 256, 2 + QK_K / 4 + QK_K / 32;
    IQ3_XXS = 18, 256, 2 + QK_K / 4 + QK_K / 8;
    IQ1_S = 19, 256, 2 + QK_K / 8 + QK_K / 16;
    IQ4_NL = 20, 32, 2 + 16;
    IQ3_S = 21, 256, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4;
    IQ2_S = 22, 256, 2 + QK_K / 4 + QK_K / 16;
    IQ4_XS = 23, 256, 2 + 2 + QK_K / 2 + QK_K / 64;
    I8 = 24, 1, 1;
    I16 = 25, 1, 2;
    I32 = 26, 1, 4;
    I64 = 27, 1, 8;
    F64 = 28, 1, 8;
    IQ1_M = 29, 256, QK_K / 8 + QK_K / 16 + QK_K / 32;
    BF16 = 30, 1, 2;
    TQ1_0 = 34, 256, 2 + 4 * 13;
    TQ2_0 = 35, 256, 2 + 64;
    MXFP4 = 39, 32, 1 + 16;
}

/// Types [`dequantize`] reads.
pub const DEQUANTIZABLE: [GgmlType; 13] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// One block: its bytes → its `block_size` values.
type BlockFn = fn(&[u8], &mut [f32]);

fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 => |b, o| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, o| o[0] = f16(b, 0),
        // bf16 is the top half of an f32.
        GgmlType::BF16 => |b, o| o[0] = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        _ => return None,
    })
}

/// Dequantizes `bytes` (whole blocks of `ty`) into `out`, whose length is the element count.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), String> {
    let f = block_fn(ty).ok_or_else(|| {
        let names: Vec<&str> = DEQUANTIZABLE.iter().map(|t| t.name()).collect();
        format!("type {} cannot be dequantized by qlora-rt (supported: {})", ty.name(), names.join(", "))
    })?;
    let (block, size) = (ty.block_size(), ty.type_size());
    if out.len() % block != 0 || bytes.len() != out.len() / block * size {
        return Err(format!(
            "{} bytes of {} do not hold {} values ({} per {}-byte block)",
            bytes.len(),
            ty.name(),
            out.len(),
            block,
            size
        ));
    }
    // Enough blocks per task that scheduling costs nothing next to the work (64 KiB of output for scalar types).
    let blocks_per_task = (16384 / block).max(1);
    out.par_chunks_mut(block * blocks_per_task).zip(bytes.par_chunks(size * blocks_per_task)).for_each(|(o, b)| {
        for (ob, bb) in o.chunks_exact_mut(block).zip(b.chunks_exact(size)) {
            f(bb, ob);
        }
    });
    Ok(())
}

/// The f16 at byte `i`, as f32.
fn f16(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q4_0 `{ d: f16, qs: [u8; 16] }`: value j < 16 is the low nibble of qs[j], value j + 16 its high nibble;
/// x = d·(q − 8).
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        o[j] = d * ((q & 0xF) as i8 - 8) as f32;
        o[j + 16] = d * ((q >> 4) as i8 - 8) as f32;
    }
}

/// Q4_1 `{ d: f16, m: f16, qs: [u8; 16] }`: x = d·q + m.
fn q4_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        o[j] = d * (q & 0xF) as f32 + m;
        o[j + 16] = d * (q >> 4) as f32 + m;
    }
}

/// The five-bit quant j of Q5_0/Q5_1: a nibble of `qs` plus bit j of the u32 `qh`.
fn q5(qs: &[u8], qh: u32, j: usize) -> u8 {
    let low = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
    low | (((qh >> j) & 1) as u8) << 4
}

/// Q5_0 `{ d: f16, qh: u32, qs: [u8; 16] }`: x = d·(q − 16).
fn q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (j, x) in o.iter_mut().enumerate() {
        *x = d * (q5(&b[6..22], qh, j) as i8 - 16) as f32;
    }
}

/// Q5_1 `{ d: f16, m: f16, qh: u32, qs: [u8; 16] }`: x = d·q + m.
fn q5_1(b: &[u8], o: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (j, x) in o.iter_mut().enumerate() {
        *x = d * q5(&b[8..24], qh, j) as f32 + m;
    }
}

/// Q8_0 `{ d: f16, qs: [i8; 32] }`: x = q·d.
fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16(b, 0);
    for (x, &q) in o.iter_mut().zip(&b[2..34]) {
        *x = q as i8 as f32 * d;
    }
}

/// Q2_K `{ scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16 }`: 16 groups of 16 values; scales[g] holds the
/// group's 4-bit scale (low nibble) and 4-bit min (high nibble). Value e = 128·h + 32·s + l (h < 2, s < 4,
/// l < 32) is bits 2s..2s+2 of qs[32·h + l]; x = (d·sc)·q − dmin·m.
fn q2_k(b: &[u8], o: &mut [f32]) {
    let (scales, qs) = (&b[..16], &b[16..80]);
    let (d, dmin) = (f16(b, 80), f16(b, 82));
    for (e, x) in o.iter_mut().enumerate() {
        let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let q = (qs[32 * h + l] >> (2 * s)) & 3;
        let sc = scales[e / 16];
        let dl = d * (sc & 0xF) as f32;
        let ml = dmin * (sc >> 4) as f32;
        *x = dl * q as f32 - ml;
    }
}

/// Q3_K `{ hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16 }`: 16 groups of 16 values with 6-bit
/// signed scales (low nibbles in bytes 0..8, two high bits each in bytes 8..12). Value e = 128·h + 32·s + l
/// takes its low two bits like Q2_K and subtracts 4 unless bit e/32 of hmask[l] is set; x = (d·(sc − 32))·q.
fn q3_k(b: &[u8], o: &mut [f32]) {
    let (hmask, qs, sc) = (&b[..32], &b[32..96], &b[96..108]);
    let d = f16(b, 108);
    let scale = |g: usize| {
        let low = if g < 8 { sc[g] & 0xF } else { sc[g - 8] >> 4 };
        let high = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
        ((low | high << 4) as i8 - 32) as f32
    };
    for (e, x) in o.iter_mut().enumerate() {
        let (h, s, l) = (e / 128, (e / 32) % 4, e % 32);
        let low = ((qs[32 * h + l] >> (2 * s)) & 3) as i8;
        let high_clear = ((hmask[l] >> (e / 32)) & 1) ^ 1;
        let dl = d * scale(e / 16);
        *x = dl * (low - (high_clear << 2) as i8) as f32;
    }
}

/// The eight 6-bit (scale, min) pairs of a Q4_K/Q5_K block, packed in 12 bytes (ggml's `get_scale_min_k4`).
fn scale_min_k4(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Q4_K `{ d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128] }`: eight groups of 32 values; value
/// e = 64·c + 32·n + l is nibble n of qs[32·c + l]; x = (d·sc)·q − dmin·m of group e/32.
fn q4_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (g, group) in o.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, g);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        for (l, x) in group.iter_mut().enumerate() {
            let q = (qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0xF;
            *x = dl * q as f32 - ml;
        }
    }
}

/// Q5_K `{ d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] }`: Q4_K's nibbles plus a fifth
/// bit, bit g of qh[l] for value l of group g.
fn q5_k(b: &[u8], o: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (g, group) in o.chunks_exact_mut(32).enumerate() {
        let (sc, m) = scale_min_k4(scales, g);
        let (dl, ml) = (d * sc as f32, dmin * m as f32);
        for (l, x) in group.iter_mut().enumerate() {
            let q = ((qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 0xF) | ((qh[l] >> g) & 1) << 4;
            *x = dl * q as f32 - ml;
        }
    }
}

/// Q6_K `{ ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }`: value e = 128·h + r takes nibble r/64 of
/// ql[64·h + r % 64] and bits 2·(r/32).. of qh[32·h + r % 32]; x = (d·scales[e/16])·(q − 32).
fn q6_k(b: &[u8], o: &mut [f32]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16(b, 208);
    for (e, x) in o.iter_mut().enumerate() {
        let (h, r) = (e / 128, e % 128);
        let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xF;
        let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
        let q = (low | high << 4) as i8 - 32;
        let dl = d * scales[e / 16] as i8 as f32;
        *x = dl * q as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deq(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; n];
        dequantize(ty, bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn sizes_match_gguf_py() {
        let expected = [
            (GgmlType::Q4_0, 18),
            (GgmlType::Q4_1, 20),
            (GgmlType::Q5_0, 22),
            (GgmlType::Q5_1, 24),
            (GgmlType::Q8_0, 34),
            (GgmlType::Q2_K, 84),
            (GgmlType::Q3_K, 110),
            (GgmlType::Q4_K, 144),
            (GgmlType::Q5_K, 176),
            (GgmlType::Q6_K, 210),
        ];
        for (t, size) in expected {
            assert_eq!(t.type_size(), size, "{t:?}");
            assert_eq!(GgmlType::from_id(t as u32), Some(t));
        }
        assert_eq!(GgmlType::from_id(30), Some(GgmlType::BF16));
        assert_eq!(GgmlType::from_id(4), None);
    }

    #[test]
    fn hand_built_blocks() {
        // Q8_0: d = 0.5, q = -2, 4.
        let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend([(-2i8) as u8, 4]);
        b.extend([0u8; 30]);
        let v = deq(GgmlType::Q8_0, &b, 32);
        assert_eq!(&v[..3], &[-1.0, 2.0, 0.0]);
        // Q4_1: d = 2, m = -1, first byte 0x31 → values 1 (low) and 3 (high, at index 16).
        let mut b = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend(half::f16::from_f32(-1.0).to_le_bytes());
        b.extend([0x31u8]);
        b.extend([0u8; 15]);
        let v = deq(GgmlType::Q4_1, &b, 32);
        assert_eq!((v[0], v[16], v[1]), (1.0, 5.0, -1.0));
        // BF16 and F16 are exact widenings.
        assert_eq!(deq(GgmlType::BF16, &half::bf16::from_f32(-3.5).to_le_bytes(), 1), vec![-3.5]);
        assert_eq!(deq(GgmlType::F16, &half::f16::from_f32(0.25).to_le_bytes(), 1), vec![0.25]);
    }

    #[test]
    fn wrong_sizes_and_unsupported_types_are_errors() {
        let mut out = vec![0.0; 32];
        assert!(dequantize(GgmlType::Q8_0, &[0; 33], &mut out).unwrap_err().contains("do not hold 32 values"));
        let e = dequantize(GgmlType::IQ2_XXS, &[0; 66], &mut vec![0.0; 256]).unwrap_err();
        assert!(e.contains("IQ2_XXS cannot be dequantized") && e.contains("Q6_K"), "{e}");
    }
}
