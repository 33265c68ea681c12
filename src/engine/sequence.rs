//! What a stage worker hands the scheduler: a request whose gate, retrieval and adaptation
//! are done, with everything its answer needs, owned (it crosses threads).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Result, Tensor};
use tokio::sync::mpsc;

use super::memory::Reservation;
use super::{Completion, Event};
use crate::adapt::domain::DomainAdapter;
use crate::adapt::{Lora, Stack};
use crate::cancel::Cancel;
use crate::generate::GenParams;
use crate::model::{Adapter, Target};

/// The adapter a sequence answers with: none, its collection's (shared, frozen), its own
/// freshly trained one, or its own over its collection's.
pub enum SeqAdapter {
    Base,
    Domain(Arc<DomainAdapter>),
    Own(Lora),
    OwnOverDomain(Lora, Arc<DomainAdapter>),
}

impl SeqAdapter {
    /// `None` for the base model, so a batch of plain rows computes no deltas at all.
    pub fn as_adapter(&self) -> Option<&dyn Adapter> {
        match self {
            Self::Base => None,
            _ => Some(self),
        }
    }
}

impl Adapter for SeqAdapter {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        match self {
            Self::Base => Ok(None),
            Self::Domain(d) => d.lora.delta(layer, target, x),
            Self::Own(l) => l.delta(layer, target, x),
            Self::OwnOverDomain(l, d) => Stack {
                under: &d.lora,
                over: l,
            }
            .delta(layer, target, x),
        }
    }
}

/// One request ready to generate.
pub struct Sequence {
    /// The prompt's token ids, passages included.
    pub prompt: Vec<u32>,
    pub gen: GenParams,
    pub adapter: SeqAdapter,
    /// Answer choices (token ids) to score after the prompt (offline evaluation).
    pub continuations: Vec<Vec<u32>>,
    pub reply: mpsc::UnboundedSender<Event>,
    pub cancel: Cancel,
    /// When the request was submitted: its deadline counts from here.
    pub enqueued: Instant,
    /// When the stage worker handed it over: waiting for admission counts as queueing.
    pub handed_over: Instant,
    /// Everything but the answer: the scheduler fills text, tokens, scores and timings.
    pub completion: Completion,
    /// Fault injection: the sequence panics at its first sampling step.
    pub panic_when_sampled: bool,
    /// The adapter's bytes in the adaptation memory budget: held, never read; dropping the
    /// sequence gives them back.
    #[allow(dead_code)]
    pub memory: Option<Reservation>,
}
