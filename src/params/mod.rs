//! The parameters a request runs with, shared by the config (defaults, arms, per-collection
//! recipes) and the engine (what runs): retrieval modes, the adaptation recipe, its overrides
//! and their resolution. Both depend on this module; it depends on neither.

mod tta;

use serde::Serialize;

use crate::adapt::{PairOptions, TrainParams};

pub use tta::{resolve_tta, ParamError, TtaOverrides, TtaSection};

/// serde's default for a switch that is on unless a file says otherwise.
pub(crate) fn yes() -> bool {
    true
}

/// How retrieval takes part in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RagMode {
    /// Retrieve, put the passages in the prompt, answer.
    Static,
    /// Retrieve, adapt the model to the passages for this request only, then answer.
    Tta,
    /// No retrieval.
    None,
}

impl RagMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Tta => "tta",
            Self::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "static" => Some(Self::Static),
            "tta" => Some(Self::Tta),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Which answer a request in mode `tta` gives (`rag.tta.select`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// The adapted model's.
    Adapted,
    /// The static and the adapted answer are both generated; the one with the higher mean
    /// token log-probability under its own model is given.
    Confident,
}

impl Select {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "adapted" => Some(Self::Adapted),
            "confident" => Some(Self::Confident),
            _ => None,
        }
    }
}

/// Which weights test-time adaptation trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtaScope {
    /// Per-request low-rank adapters; the shared weights are read only.
    Lora,
    /// Every weight, on a private copy; serialised to bound memory.
    Full,
}

impl TtaScope {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lora" => Some(Self::Lora),
            "full" => Some(Self::Full),
            _ => None,
        }
    }
}

/// Adaptation settings of one request (mode `tta`), validated and capped.
#[derive(Debug, Clone)]
pub struct TtaParams {
    pub scope: TtaScope,
    /// Passages adaptation learns from: the prompt's `top_k` and the next ones (0 = the
    /// prompt's alone).
    pub adapt_top_k: usize,
    pub select: Select,
    pub pairs: PairOptions,
    pub train: TrainParams,
}
