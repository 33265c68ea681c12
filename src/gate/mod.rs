//! The retrieval gate: a small classifier over the model's own hidden states decides per
//! question whether retrieval (and adaptation) is used.
//!
//! Serving needs `assess`, `card`, `features`, `policy` and the probe's inference; the rest is
//! the lab's (training the probe, choosing its layer, reporting), built with feature `lab`.
//!
//! - [`features`] reads the question prompt's hidden state at every layer.
//! - `labels` gives each question answered by two eval arms (without and with retrieval) its
//!   class.
//! - [`probe`] trains and runs the classifier (logistic or one-hidden-layer MLP) over
//!   standardised hidden-state features, saves it as safetensors, and holds the metrics used to
//!   judge it (accuracy, macro-F1, majority baseline, stratified split).
//! - [`card`] is the saved artefact (JSON card + weights) and its checks against the served
//!   model; [`assess`] runs it on a request.
//! - `sweep` is the layer-wise analysis that picks the layer, position and probe kind.
//! - [`policy`] names the four MMA-RAG classes (S1..S4) and turns the probe's class
//!   probabilities into a retrieve/skip decision.

pub mod assess;
pub mod card;
pub mod features;
#[cfg(feature = "lab")]
pub mod labels;
pub mod policy;
pub mod probe;
#[cfg(feature = "lab")]
pub mod report;
#[cfg(feature = "lab")]
pub mod sweep;
