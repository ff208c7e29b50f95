//! The scalar type CPU kernels are generic over.
//!
//! Production CPU compute is f32 (bf16/f16 weights are upcast on the fly by `runtime`); f64 exists so that
//! finite-difference tests can check every backward to ~1e-7 instead of drowning in f32 rounding.

use std::fmt::Debug;
use std::iter::Sum;

/// f32 or f64.
pub trait Float: num_traits::Float + num_traits::FromPrimitive + Default + Debug + Sum + Send + Sync + 'static {
    /// A constant in this precision (`T::c(0.5)`): the f64 literal rounded once.
    fn c(v: f64) -> Self;
    /// Widen to f64 (exact for both implementors).
    fn f64(self) -> f64;
}

impl Float for f32 {
    #[inline(always)]
    fn c(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    #[inline(always)]
    fn c(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}
