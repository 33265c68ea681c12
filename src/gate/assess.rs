//! The gate at request time: read the question's hidden state at the card's tap, run the probe,
//! apply the policy.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::card::{Decides, LoadedGate, Pass};
use super::features::{feature_row, prompt_features};
use super::policy::{decide, Decision, Policy, CLASSES};
use crate::model::{ChatMessage, Model};

/// What a gate did for one request (the response's `rag.gate` or `rag.adapt_gate`).
#[derive(Debug, Clone, PartialEq)]
pub struct GateReport {
    pub decides: Decides,
    pub policy: Policy,
    pub decision: Decision,
    /// Class probabilities, keyed `S1`..`S4`.
    pub probs: BTreeMap<&'static str, f32>,
    pub layer: usize,
    pub gate_ms: f64,
}

impl GateReport {
    /// The decision in the card's terms: `retrieve` or `adapt`, else `skip`.
    pub fn action(&self) -> &'static str {
        match (self.decision, self.decides) {
            (Decision::Skip, _) => "skip",
            (Decision::Retrieve, Decides::Retrieval) => "retrieve",
            (Decision::Retrieve, Decides::Adaptation) => "adapt",
        }
    }
}

/// Hand-written only to put [`GateReport::action`] on the wire as `decision`.
impl Serialize for GateReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("GateReport", 6)?;
        st.serialize_field("decides", &self.decides)?;
        st.serialize_field("policy", &self.policy)?;
        st.serialize_field("decision", self.action())?;
        st.serialize_field("probs", &self.probs)?;
        st.serialize_field("layer", &self.layer)?;
        st.serialize_field("gate_ms", &self.gate_ms)?;
        st.end()
    }
}

impl LoadedGate {
    /// Whether the probe reads the prompt with passages too, so retrieval must run first.
    pub fn needs_passages(&self) -> bool {
        self.card.features.pass == Pass::Post
    }

    /// Decides for the prompt the model would answer without retrieval (`messages` as sent);
    /// a post-pass probe also reads `with_passages`, the prompt as retrieval would change it.
    pub fn assess(
        &self,
        model: &Model,
        messages: &[ChatMessage],
        with_passages: Option<&[ChatMessage]>,
        policy: Policy,
    ) -> Result<GateReport> {
        let t = Instant::now();
        let tap = self.card.features;
        let depth = Some(tap.layer);
        let pre = prompt_features(model, messages, depth).context("gate features")?;
        let post = match (tap.pass, with_passages) {
            (Pass::Pre, _) => None,
            (Pass::Post, Some(m)) => {
                Some(prompt_features(model, m, depth).context("gate features with passages")?)
            }
            (Pass::Post, None) => anyhow::bail!("a post-pass gate needs the retrieved passages"),
        };
        let row = feature_row(&pre, post.as_ref(), tap.pass, tap.layer, tap.position)
            .with_context(|| format!("layer {} not read", tap.layer))?;
        let p = self
            .probe
            .predict_proba(&[row])?
            .pop()
            .context("probe returned no row")?;
        let probs4: [f32; 4] = p
            .as_slice()
            .try_into()
            .context("probe does not output four classes")?;
        Ok(GateReport {
            decides: self.card.decides,
            policy,
            decision: decide(policy, &probs4),
            probs: CLASSES.iter().copied().zip(probs4).collect(),
            layer: tap.layer,
            gate_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }
}
