//! The adaptation stage: test-time training on the retrieved passages.

mod adamw;
pub mod domain;
mod fallback;
mod lora;
pub mod memory;
mod pairs;
mod stack;
mod train;

pub use adamw::FastAdamW;
pub use fallback::Fallback;
pub use lora::{parse_target, target_name, Lora, LoraConfig};
pub use pairs::{build_pairs, split_pair, split_sentences, Pair, PairOptions, PairSet, PairSource};
pub use stack::Stack;
pub use train::{
    adapt_full, adapt_lora, batch_loss, clip_global_norm, encode_pair, encode_pairs, global_norm,
    mean_loss, suffix_loss, Example, TrainParams, TtaReport,
};
