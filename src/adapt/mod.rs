//! The adaptation stage: test-time training on the retrieved passages.

mod pairs;

pub use pairs::{build_pairs, split_pair, split_sentences, Pair, PairOptions, PairSet, PairSource};
