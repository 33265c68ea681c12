//! Domain adapters: one LoRA per collection, trained offline (`ttarag index adapt`) on the
//! collection's passages and/or labelled questions answered from them, saved beside the
//! index with a card, and used frozen under every request on that collection that asks for
//! it. A request's own adaptation (mode `tta`) trains on top ([`crate::adapt::Stack`]).

mod card;
mod store;
mod trainer;

pub use card::{
    adapter_dir, file_sha256, save_adapter, write_atomic, DomainCard, Shape, TrainingData,
    ADAPTER_FILE, CARD_FILE, CARD_FORMAT,
};
pub use store::{load_lora, DomainAdapter, DomainAdapters};
pub use trainer::{examples_sha256, schedule, train_domain, DomainTrain, OnStep, Trained};

#[cfg(test)]
mod tests;
