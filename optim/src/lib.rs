//! qlora-rt optimizers. Owns: parameter updates, learning-rate schedules and gradient clipping. Must not own
//! gradient computation (`autograd`) or the training loop (`cli`).

mod adamw;
mod schedule;

pub use adamw::{clip_grad_norm, AdamW, AdamWConfig, AdamWState, GradNorm, ParamMoments};
pub use schedule::{Schedule, ScheduleKind};
