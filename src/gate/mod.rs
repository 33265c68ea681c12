//! The retrieval gate: a small classifier over the model's own hidden states decides per
//! question whether retrieval (and adaptation) is used.
//!
//! - [`features`] reads the question prompt's hidden state at every layer.
//! - [`probe`] runs the classifier (logistic or one-hidden-layer MLP) over standardised
//!   hidden-state features and loads it from safetensors; in the lab build it also trains it
//!   and holds the metrics that judge it.
//! - [`card`] is the saved artefact (JSON card + weights) and its checks against the served
//!   model; [`assess`] runs it on a request.
//! - [`policy`] names the four MMA-RAG classes (S1..S4) and turns the probe's class
//!   probabilities into a retrieve/skip decision.
//!
//! Labels from eval records, the layer sweep and its report are the lab's: `eval/gate/`.

pub mod assess;
pub mod card;
pub mod features;
pub mod policy;
pub mod probe;
