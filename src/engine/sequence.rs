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
use crate::model::{Adapter, LowRank, Target};

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

    /// The one LoRA this adapter is, where it is one (its collection's or its own).
    fn single(&self) -> Option<&Lora> {
        match self {
            Self::Domain(d) => Some(&d.lora),
            Self::Own(l) => Some(l),
            Self::Base | Self::OwnOverDomain(..) => None,
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

    // A single LoRA shows its factors, so a batch of them is gathered (and a GPU adds each
    // delta in one launch). Two stacked ones are a sum of two low-rank deltas: computed alone.
    fn low_rank(&self, layer: usize, target: Target) -> Option<LowRank<'_>> {
        self.single()?.low_rank(layer, target)
    }

    fn is_low_rank(&self) -> bool {
        match (self, self.single()) {
            (_, Some(l)) => l.is_low_rank(),
            (Self::Base, None) => true,
            (_, None) => false,
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::SeqAdapter;
    use crate::adapt::{Lora, LoraConfig};
    use crate::model::tiny::tiny_config;
    use crate::model::{Adapter, Arch, Gathered, PerRow, RowFactors, Target};

    #[test]
    fn a_requests_own_adapter_reaches_the_batch_as_factors() {
        // The scheduler's rows are `SeqAdapter`s: a request's own LoRA must show the batch its
        // factors, or every batched step computes each row's delta alone (and a GPU never
        // takes its one-launch LoRA kernels).
        let cfg = tiny_config(Arch::Llama);
        let lora = |seed| Lora::new(&cfg, &LoraConfig::default(), seed, &Device::Cpu, DType::F32);
        let (one, two) = (
            SeqAdapter::Own(lora(1).unwrap()),
            SeqAdapter::Own(lora(2).unwrap()),
        );
        let (SeqAdapter::Own(l1), SeqAdapter::Own(l2)) = (&one, &two) else {
            unreachable!()
        };
        let want = l1
            .low_rank(0, Target::Q)
            .expect("a LoRA outside training is low-rank");
        let got = one
            .low_rank(0, Target::Q)
            .expect("the request's adapter is too");
        assert_eq!(got.id, want.id);
        assert_ne!(got.id, l2.low_rank(0, Target::Q).unwrap().id);
        assert_eq!((got.a.id(), got.b.id()), (want.a.id(), want.b.id()));
        assert!(SeqAdapter::Base.low_rank(0, Target::Q).is_none());
        assert!(one.is_low_rank() && SeqAdapter::Base.is_low_rank());

        let gathered = Gathered::default();
        let rows: Vec<Option<&dyn Adapter>> = vec![Some(&one), None, Some(&two)];
        let x = Tensor::ones((3, 1, cfg.hidden_size), DType::F32, &Device::Cpu).unwrap();
        let per_row = PerRow::with_cache(rows, &gathered);
        match per_row.row_factors(0, Target::Q, &x).unwrap() {
            Some(RowFactors::Stacked { a, .. }) => assert_eq!(a.dim(0).unwrap(), 3),
            _ => panic!("a batch of request adapters stacks its factors"),
        }
        assert_eq!(gathered.entries(), 1);
    }
}
