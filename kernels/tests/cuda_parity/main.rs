//! GPU parity (STYLE.md §12, tier 3): every CUDA kernel against its CPU twin on fresh random inputs, at several
//! shapes (odd ones included), in f32 and bf16. Outputs start as NaN, so an element a kernel forgets to write fails.
//!
//! The CPU twin of a bf16 kernel is the f32 CPU kernel on the widened inputs, its outputs rounded once to bf16: what
//! the GPU does in registers. Tolerances: f32 `Tolerance::F32` (same operations, fused multiply-adds and libm vs CUDA
//! math differ in the last bits), `common::REDUCED` where a sum runs in another order, bf16 `Tolerance::BF16` (one
//! rounding of nearly equal values can land one bf16 ulp apart), and exact where the kernel promises the CPU's bits.
//!
//! Each test prints `qlora-gpu: <test>: ran on cuda:0 (...)` or `qlora-gpu: <test>: skipped: <why>`; without a GPU
//! they skip (and pass), unless QLORA_REQUIRE_GPU=1, which makes a missing GPU a failure (scripts/gpu-check.sh sets
//! it on the GPU machine).
//!
//! One module per op (the kernels of `kernels/src/cuda/<op>.rs`); `device` holds the checks of the device itself.

mod common;

mod activation;
mod adamw;
mod attention;
mod copy;
mod cross_entropy;
mod device;
mod dora;
mod elementwise;
mod embedding;
mod lora;
mod matmul;
mod nf4;
mod reduce;
mod rms_norm;
mod rope;
