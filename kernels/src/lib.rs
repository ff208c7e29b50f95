//! qlora-rt kernels: the leaf of the workspace. No tensor type lives here.
//!
//! Conventions every kernel follows (so `runtime` can dispatch without surprises):
//! - Inputs are contiguous row-major slices plus explicit shape arguments; the shape is written once in a
//!   one-line comment on each function (`x: [rows, dim] → y: [rows, dim]`).
//! - Outputs are `&mut` slices that the kernel overwrites completely (every element written), except where a
//!   function's name says `accumulate`/`add` (scatter-add into an existing gradient buffer).
//! - Length mismatches are caller bugs (`runtime` validates user-facing shapes first), so kernels `assert!` them.
//! - Generic over [`Float`] (f32 in production, f64 for finite-difference tests); parallel with rayon.
//! - One op, one file: the CPU reference here, its CUDA twin beside it when it exists, its tests at the bottom.

pub mod float;
pub mod rng;
pub mod testing;

pub use float::Float;
pub use rng::Rng;

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod cuda;
pub mod dora;
pub mod elementwise;
pub mod embedding;
pub mod lora;
pub mod matmul;
pub mod nf4;
pub mod reduce;
pub mod rms_norm;
pub mod rope;
