//! qlora-rt autograd: a tape specialised for frozen-base + trainable-adapter graphs.
//!
//! Owns: recording coarse ops, their hand-written backward, parameters and their gradient buffers,
//! `no_grad`, and checkpoint scopes. Must not own numerics (that is `runtime`/`kernels`) or model structure.
//!
//! ```
//! use qlora_autograd::{Param, Tape};
//! use qlora_runtime::{DType, Tensor};
//! let w = Param::trainable("w", Tensor::ones(&[2, 3], DType::F32));
//! let tape = Tape::new();
//! let x = qlora_autograd::Var::constant(Tensor::ones(&[4, 3], DType::F32));
//! let y = tape.linear(&x, &tape.param(&w), None).unwrap();
//! let loss = tape.sum(&y).unwrap();
//! tape.backward(&loss).unwrap();
//! assert_eq!(w.grad().unwrap().to_vec::<f32>(), vec![4.0; 6]);
//! ```

mod checkpoint;
mod lora;
mod ops;
mod param;
mod park;
mod tape;

pub use lora::{merged_weight, unmerged_weight, AdapterSet, LoraAdapter, LoraConfig, LoraInit, LoraProjection, NormOf};
pub use param::Param;
pub use qlora_runtime::ops::activation::Glu;
pub use qlora_runtime::ops::attention::{AttentionParams, SeqLens};
pub use tape::{Backward, SavedBytes, Tape, Var};
