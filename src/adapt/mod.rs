//! The adaptation stage: test-time training on the retrieved passages.

mod adamw;
/// The GPU optimiser kernels' source run on the CPU against `FastAdamW`.
#[cfg(test)]
mod adamw_kernel_tests;
pub mod domain;
mod fallback;
mod lora;
pub mod memory;
mod norms;
mod pairs;
mod stack;
mod train;

pub use adamw::FastAdamW;
pub use fallback::Fallback;
pub use lora::{parse_target, target_name, Lora, LoraConfig};
pub use norms::{clip_global_norm, global_norm};
pub use pairs::{build_pairs, split_pair, split_sentences, Pair, PairOptions, PairSet, PairSource};
pub use stack::Stack;
pub use train::{
    adapt_full, adapt_lora, batch_loss, encode_pair, encode_pairs, mean_loss, suffix_loss, Example,
    TrainParams, TtaReport,
};
