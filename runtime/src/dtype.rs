//! Element types and the bridge between typed host vectors and the dynamically typed storage.

use half::{bf16, f16};

/// Element type of a tensor. F64 exists for finite-difference tests of the whole stack; models use F32 master
/// weights on CPU and BF16/F16 storage where memory matters. (Packed NF4 lives beside, not inside, this enum:
/// it needs a quantization state, not just an element size.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    BF16,
    F16,
    I32,
    U8,
}

impl DType {
    /// The one precision rule every op follows, chosen from its float operands' dtypes on `device`: f64 when any is
    /// f64 (CPU gradient checks); on CUDA bf16 when any is bf16 (bf16 activations take f32 master adapters down to
    /// bf16 for the products, as autocast does); f32 otherwise (the CPU computes bf16 inputs in f32).
    pub fn compute(device: crate::Device, dtypes: impl IntoIterator<Item = DType>) -> DType {
        let mut out = DType::F32;
        for d in dtypes {
            match d {
                DType::F64 => return DType::F64,
                DType::BF16 if device != crate::Device::Cpu => out = DType::BF16,
                _ => {}
            }
        }
        out
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::U8 => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::BF16 | DType::F16)
    }

    /// The name safetensors and Hugging Face use (`"F32"`, `"BF16"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::I32 => "I32",
            DType::U8 => "U8",
        }
    }
}

/// Host vector of one dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum CpuStorage {
    F64(Vec<f64>),
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    I32(Vec<i32>),
    U8(Vec<u8>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::I32(_) => DType::I32,
            CpuStorage::U8(_) => DType::U8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F64(v) => v.len(),
            CpuStorage::F32(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::I32(v) => v.len(),
            CpuStorage::U8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes (for saving).
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F64(v) => bytemuck::cast_slice(v),
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::I32(v) => bytemuck::cast_slice(v),
            CpuStorage::U8(v) => v,
        }
    }
}

/// A Rust scalar type that a tensor can hold. Conversions go through f64, which represents every value of
/// every element type exactly (so a cast is one rounding, the same as a direct conversion).
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn wrap(v: Vec<Self>) -> CpuStorage;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]>;
}

/// `v` in f32, rounded toward the neighbour with an odd last bit when it is not exact ("round to odd"). Rounding that
/// to a type of at most 22 significant bits (bf16, f16) to nearest even rounds `v` itself once, as torch and the GPU's
/// `cvt.rn` do. `half`'s own `from_f64` drops the low 32 bits of `v` before rounding, so a value just above a tie (an
/// f32 whose bits past bf16's are 1000…0001, about 1 in 20,000) rounds down there.
pub fn f32_round_to_odd(v: f64) -> f32 {
    let nearest = v as f32;
    if nearest as f64 == v || v.is_nan() || nearest.to_bits() & 1 == 1 {
        return nearest;
    }
    // The even neighbour was chosen: step one ulp toward v (down in magnitude when the rounding went up in it).
    let bits = nearest.to_bits();
    let up_in_magnitude = (nearest as f64).abs() > v.abs();
    f32::from_bits(if up_in_magnitude { bits - 1 } else { bits + 1 })
}

/// An f64 rounded once to bf16 (see [`f32_round_to_odd`]).
pub fn bf16_from_f64(v: f64) -> bf16 {
    bf16::from_f32(f32_round_to_odd(v))
}

/// An f64 rounded once to f16 (see [`f32_round_to_odd`]).
pub fn f16_from_f64(v: f64) -> f16 {
    f16::from_f32(f32_round_to_odd(v))
}

macro_rules! element {
    ($t:ty, $variant:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$variant;
            #[inline(always)]
            fn to_f64(self) -> f64 {
                $to(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
            fn wrap(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut [Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

element!(f64, F64, |x| x, |v| v);
element!(f32, F32, |x: f32| x as f64, |v| v as f32);
element!(bf16, BF16, |x: bf16| x.to_f64(), bf16_from_f64);
element!(f16, F16, |x: f16| x.to_f64(), f16_from_f64);
// Integer casts from floats truncate toward zero and saturate, as `as` does; ids are never produced that way.
element!(i32, I32, |x: i32| x as f64, |v: f64| v as i32);
element!(u8, U8, |x: u8| x as f64, |v: f64| v as u8);

/// Converts one storage to another dtype (one rounding per element).
pub fn convert(src: &CpuStorage, to: DType) -> CpuStorage {
    fn go<S: Element, D: Element>(v: &[S]) -> CpuStorage {
        D::wrap(v.iter().map(|&x| D::from_f64(x.to_f64())).collect())
    }
    fn from<S: Element>(v: &[S], to: DType) -> CpuStorage {
        match to {
            DType::F64 => go::<S, f64>(v),
            DType::F32 => go::<S, f32>(v),
            DType::BF16 => go::<S, bf16>(v),
            DType::F16 => go::<S, f16>(v),
            DType::I32 => go::<S, i32>(v),
            DType::U8 => go::<S, u8>(v),
        }
    }
    if src.dtype() == to {
        return src.clone();
    }
    match src {
        // bf16/f16 → f32 is the hot path when weights are upcast for CPU compute: use half's direct conversion.
        CpuStorage::BF16(v) if to == DType::F32 => CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(v) if to == DType::F32 => CpuStorage::F32(v.iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F64(v) => from(v, to),
        CpuStorage::F32(v) => from(v, to),
        CpuStorage::BF16(v) => from(v, to),
        CpuStorage::F16(v) => from(v, to),
        CpuStorage::I32(v) => from(v, to),
        CpuStorage::U8(v) => from(v, to),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_once() {
        let s = CpuStorage::F32(vec![1.0, 1.0 + 1.0 / 256.0, -3.3, 65504.0 * 2.0]);
        let b = convert(&s, DType::BF16);
        let CpuStorage::BF16(v) = &b else { panic!("dtype") };
        assert_eq!(v[0].to_f32(), 1.0);
        assert_eq!(v[2], bf16::from_f32(-3.3));
        let h = convert(&s, DType::F16);
        let CpuStorage::F16(v) = &h else { panic!("dtype") };
        assert!(v[3].to_f32().is_infinite(), "f16 overflows to inf like torch");
        assert_eq!(convert(&b, DType::F32).dtype(), DType::F32);
    }

    #[test]
    fn a_value_just_above_a_tie_rounds_up() {
        // 1 + 2⁻⁸ + 2⁻²³: bf16's round bit set, then only the f32's last bit, which half's from_f64 never sees.
        let x = f32::from_bits(0x3F80_8001);
        assert_eq!(bf16::from_f32(x).to_bits(), 0x3F81);
        assert_eq!(bf16::from_f64(x as f64).to_bits(), 0x3F80, "half's from_f64 still truncates (else drop this fix)");
        assert_eq!(<bf16 as Element>::from_f64(x as f64).to_bits(), 0x3F81);
        // The same for f16: round bit 2⁻¹¹ of 1.0, then 2⁻²³.
        let y = f32::from_bits(0x3F80_1001);
        assert_eq!(<f16 as Element>::from_f64(y as f64), f16::from_f32(y));
        assert!(<f16 as Element>::from_f64(y as f64) > f16::ONE);
        // An f64 past f32's precision just above the tie: a plain cast to f32 would land on the tie and round down.
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-40);
        assert_eq!(bf16_from_f64(v).to_bits(), 0x3F81);
        assert_eq!(bf16_from_f64(-v).to_bits(), 0xBF81);
        assert_eq!(bf16_from_f64(1.0 + 2f64.powi(-8)).to_bits(), 0x3F80, "an exact tie goes to even");
    }

    #[test]
    fn conversions_to_bf16_round_to_nearest_even() {
        // References by bit arithmetic: an f32's bf16 is its top half after adding 0x7FFF plus the kept lsb; an f64's
        // (normal range) the same on its 52-bit mantissa, 45 bits dropped. Random patterns, half of them with the
        // dropped bits forced around the tie.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state
        };
        for i in 0..200_000u32 {
            let mut bits = (next() >> 32) as u32;
            if i % 2 == 1 {
                bits = (bits & 0xFFFF_0000) | [0x8000, 0x8001, 0x7FFF, 0x8004, 0x0001][(i as usize / 2) % 5];
            }
            let x = f32::from_bits(bits);
            if !x.is_finite() {
                continue;
            }
            let want = (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16;
            assert_eq!(<bf16 as Element>::from_f64(x as f64).to_bits(), want, "bf16 of f32 {bits:#x}");

            // An f64 of magnitude 2^-100 … 2^100 with random low bits.
            let mut b = (next() & 0x800F_FFFF_FFFF_FFFF) | ((1023 - 100 + next() % 200) << 52);
            if i % 2 == 1 {
                b = (b & !((1 << 45) - 1)) | [1 << 44, (1 << 44) + 1, (1 << 44) - 1, 1][(i as usize / 2) % 4];
            }
            let rounded = f64::from_bits(b.wrapping_add((1 << 44) - 1 + ((b >> 45) & 1)) >> 45 << 45);
            assert_eq!(bf16_from_f64(f64::from_bits(b)), bf16::from_f32(rounded as f32), "bf16 of f64 {b:#x}");
        }
        assert_eq!(f32_round_to_odd(1e-50), f32::from_bits(1), "below f32: the smallest subnormal, odd");
        assert_eq!(f32_round_to_odd(-1e-50), -f32::from_bits(1));
        assert_eq!(f32_round_to_odd(1e39), f32::MAX);
        assert!(bf16_from_f64(1e39).to_f32().is_infinite());
    }
}
