//! What every parity module shares: the I/O types under test, random inputs, NaN-poisoned outputs, the comparison
//! against the CPU twin, and the shapes and tolerances the modules use.

use half::bf16;
use qlora_kernels::cuda::{CudaDevice, DeviceBuffer, GpuFloat};
use qlora_kernels::testing::{assert_close, Tolerance};
use qlora_kernels::{cuda, Rng};

/// f32 outputs that depend on a sum over hundreds to thousands of terms, which the GPU adds in another order.
pub(crate) const REDUCED: Tolerance = Tolerance { abs: 1e-4, rel: 1e-4 };
/// The kernel promises the CPU's bits.
pub(crate) const EXACT: Tolerance = Tolerance { abs: 0.0, rel: 0.0 };

/// Element counts: one element, odd sizes, and more than one grid-stride pass of small grids.
pub(crate) const LENS: [usize; 5] = [1, 7, 1000, 4099, 70_001];
/// (rows, dim) of row kernels: single elements, dims below, at and past the block size, odd everywhere.
pub(crate) const ROWS: [(usize, usize); 6] = [(1, 1), (3, 5), (7, 17), (4, 257), (33, 1000), (2, 4099)];

/// The I/O types under test.
pub(crate) trait Elem: GpuFloat {
    const NAME: &'static str;
    const TOL: Tolerance;
    /// This type's tolerance for a kernel whose f32 tolerance is `f32_tol` (looser or exact per kernel).
    fn tol(f32_tol: Tolerance) -> Tolerance;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Elem for f32 {
    const NAME: &'static str = "f32";
    const TOL: Tolerance = Tolerance::F32;
    fn tol(f32_tol: Tolerance) -> Tolerance {
        f32_tol
    }
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    const TOL: Tolerance = Tolerance::BF16;
    fn tol(_: Tolerance) -> Tolerance {
        Tolerance::BF16
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// `n` values `scale·N(0, 1)`, in T.
pub(crate) fn randn<T: Elem>(rng: &mut Rng, n: usize, scale: f64) -> Vec<T> {
    (0..n).map(|_| T::from_f32((scale * rng.normal()) as f32)).collect()
}

pub(crate) fn widen<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|&x| x.to_f32()).collect()
}

pub(crate) fn narrow<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

pub(crate) fn upload<T: cuda::DeviceCopy>(dev: &CudaDevice, v: &[T]) -> DeviceBuffer<T> {
    dev.upload(v).expect("upload")
}

/// A buffer of `n` NaNs: every element the kernel leaves unwritten fails the comparison.
pub(crate) fn poisoned<T: Elem>(dev: &CudaDevice, n: usize) -> DeviceBuffer<T> {
    upload(dev, &vec![T::from_f32(f32::NAN); n])
}

/// Compares a device buffer with the CPU twin's f32 result rounded to T.
#[track_caller]
pub(crate) fn check<T: Elem>(what: &str, got: &DeviceBuffer<T>, want: &[f32], tol: Tolerance) {
    let got: Vec<f64> = got.to_vec().expect("download").iter().map(|&v| v.to_f32() as f64).collect();
    let want: Vec<f64> = want.iter().map(|&v| T::from_f32(v).to_f32() as f64).collect();
    assert_close(&format!("{what} [{}]", T::NAME), &got, &want, tol);
}

/// Declares the test `$name`: `$case` for f32, then for bf16, on the GPU (skipped without one, as `gpu` says), with
/// one `Rng::new($seed)` for both.
macro_rules! parity_test {
    ($(#[$attr:meta])* $name:ident: $case:ident, seed $seed:expr) => {
        $(#[$attr])*
        #[test]
        fn $name() {
            let Some(dev) = qlora_kernels::testing::gpu(stringify!($name)) else { return };
            let rng = &mut qlora_kernels::Rng::new($seed);
            $case::<f32>(&dev, rng);
            $case::<half::bf16>(&dev, rng);
        }
    };
}
pub(crate) use parity_test;
