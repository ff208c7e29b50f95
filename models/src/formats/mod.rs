//! The files models and adapters come in and go out as, each byte for byte as its reference writes it: safetensors
//! checkpoints ([`checkpoint`]), bitsandbytes 4-bit checkpoints ([`bnb`]), PEFT adapter folders ([`peft`]), llama.cpp
//! GGUF ([`gguf`]), `tokenizer.json` and the generation and chat-template settings beside it ([`tokenizer`]), the
//! atomic writes they all publish through ([`fsutil`]), and the TensorBoard event files training logs to
//! ([`tfevents`]).
//!
//! Owns: names, layouts and checks of those files. Must not own the model's computation (`transformer`, `generate`):
//! a format reads into and writes from the definitions' types.

pub mod bnb;
pub mod checkpoint;
pub mod fsutil;
pub mod gguf;
pub mod peft;
pub mod tfevents;
pub mod tokenizer;
