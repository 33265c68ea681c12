//! The adaptation stage: test-time training on the retrieved passages.

mod adamw;
mod lora;
mod pairs;
mod train;

pub use adamw::FastAdamW;
pub use lora::{parse_target, Lora, LoraConfig};
pub use pairs::{build_pairs, split_pair, split_sentences, Pair, PairOptions, PairSet, PairSource};
pub use train::{
    adapt_full, adapt_lora, batch_loss, clip_global_norm, encode_pair, encode_pairs, mean_loss,
    suffix_loss, Example, TrainParams, TtaReport,
};
