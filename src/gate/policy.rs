//! The four MMA-RAG classes and the policies that turn a probe's class probabilities into a
//! retrieve/skip decision.
//!
//! A question's class comes from an evaluation that answered it twice, without and with
//! retrieval (see [`class_of`]). The probe predicts the class from the question's hidden states
//! before anything is retrieved; [`decide`] then applies a [`Policy`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Class names, in class-index order everywhere (labels, probe outputs, reports):
/// index 0 = S1, 1 = S2, 2 = S3, 3 = S4.
pub const CLASSES: [&str; 4] = ["S1", "S2", "S3", "S4"];

/// Index of S1: wrong both without and with retrieval.
pub const S1: usize = 0;
/// Index of S2: right only with retrieval (retrieval helps).
pub const S2: usize = 1;
/// Index of S3: right only without retrieval (retrieval harms).
pub const S3: usize = 2;
/// Index of S4: right both ways.
pub const S4: usize = 3;

/// The class index of a question from its two evaluation outcomes.
///
/// | right without | right with | class      |
/// |---------------|------------|------------|
/// | false         | false      | 0 = S1     |
/// | false         | true       | 1 = S2     |
/// | true          | false      | 2 = S3     |
/// | true          | true       | 3 = S4     |
///
/// That is `2 * right_without + right_with`, so the index order matches [`CLASSES`].
pub fn class_of(right_without: bool, right_with: bool) -> usize {
    2 * usize::from(right_without) + usize::from(right_with)
}

/// Gate settings a request (`rag.gate`) or an A/B arm may give for mode `auto`; unset keys
/// fall back to the `[gate]` config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateChoice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// What runs when the gate retrieves: `static` or `tta`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<String>,
    /// With `then` = `tta`: the adaptation gate's policy (adapt, or answer static).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt: Option<Policy>,
}

/// What the gate does with a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Retrieve (and adapt, where adaptation is on).
    Retrieve,
    /// Answer from the model alone.
    Skip,
}

impl Decision {
    /// True for [`Decision::Retrieve`].
    pub fn retrieves(self) -> bool {
        self == Decision::Retrieve
    }

    /// The wire name: `retrieve` or `skip`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Retrieve => "retrieve",
            Decision::Skip => "skip",
        }
    }
}

/// How class probabilities become a decision (see [`decide`]).
///
/// Serialised as `"always"`, `"optimistic"`, `"pessimistic"` or `{"threshold": 0.3}`; when
/// deserialising, the string form `"threshold:0.3"` is accepted as well (same syntax as
/// [`FromStr`]). A threshold must be finite and within `[0, 1]` when parsed or deserialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Policy {
    /// Always retrieve (the gate is off).
    Always,
    /// Retrieve unless the most likely class is S3 (retrieval harmful).
    Optimistic,
    /// Retrieve only when the most likely class is S2 (retrieval needed).
    Pessimistic,
    /// Retrieve when P(S2) >= the threshold.
    Threshold(f32),
}

impl fmt::Display for Policy {
    /// The [`FromStr`] syntax: `always`, `optimistic`, `pessimistic`, `threshold:<t>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Always => f.write_str("always"),
            Policy::Optimistic => f.write_str("optimistic"),
            Policy::Pessimistic => f.write_str("pessimistic"),
            Policy::Threshold(t) => write!(f, "threshold:{t}"),
        }
    }
}

fn check_threshold(t: f32) -> Result<f32, String> {
    if t.is_finite() && (0.0..=1.0).contains(&t) {
        Ok(t)
    } else {
        Err(format!(
            "policy threshold must be a probability in [0, 1], got {t}"
        ))
    }
}

impl FromStr for Policy {
    type Err = String;

    /// Parses `always`, `optimistic`, `pessimistic` or `threshold:<t>` with `t` in `[0, 1]`
    /// (case-insensitive, surrounding whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "always" => Ok(Policy::Always),
            "optimistic" => Ok(Policy::Optimistic),
            "pessimistic" => Ok(Policy::Pessimistic),
            other => match other.strip_prefix("threshold:") {
                Some(t) => {
                    let t: f32 = t.trim().parse().map_err(|_| {
                        format!("policy `{s}`: threshold `{}` is not a number", t.trim())
                    })?;
                    check_threshold(t).map(Policy::Threshold)
                }
                None if other == "threshold" => Err(format!(
                    "policy `{s}`: threshold needs a value, e.g. `threshold:0.3`"
                )),
                None => Err(format!(
                    "unknown gate policy `{s}`: expected always, optimistic, pessimistic or \
                     threshold:<t>"
                )),
            },
        }
    }
}

/// The wire forms of a policy.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum PolicyRepr {
    Name(String),
    Threshold { threshold: f32 },
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Policy::Threshold(threshold) => PolicyRepr::Threshold { threshold },
            other => PolicyRepr::Name(other.to_string()),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let repr = PolicyRepr::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "gate policy must be \"always\", \"optimistic\", \"pessimistic\", \
                 \"threshold:<t>\" or {\"threshold\": <t>}",
            )
        })?;
        match repr {
            PolicyRepr::Name(s) => s.parse().map_err(serde::de::Error::custom),
            PolicyRepr::Threshold { threshold } => check_threshold(threshold)
                .map(Policy::Threshold)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// Index of the largest probability; ties go to the lowest index, and NaN never wins over a
/// number (all NaN: 0).
pub fn argmax(probs: &[f32]) -> usize {
    crate::numeric::argmax(probs).unwrap_or(0)
}

/// The decision for one question from its class probabilities (in [`CLASSES`] order):
/// - `Always`: retrieve;
/// - `Optimistic`: retrieve unless the argmax class is S3;
/// - `Pessimistic`: retrieve only when the argmax class is S2;
/// - `Threshold(t)`: retrieve when P(S2) >= t (equality retrieves; a NaN probability skips).
///
/// Argmax ties go to the lowest class index (see [`argmax`]).
pub fn decide(policy: Policy, probs: &[f32; 4]) -> Decision {
    let retrieve = match policy {
        Policy::Always => true,
        Policy::Optimistic => argmax(probs) != S3,
        Policy::Pessimistic => argmax(probs) == S2,
        Policy::Threshold(t) => probs[S2] >= t,
    };
    if retrieve {
        Decision::Retrieve
    } else {
        Decision::Skip
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Retrieve, Skip};

    #[test]
    fn class_of_maps_outcomes_to_documented_classes() {
        assert_eq!(CLASSES[class_of(false, false)], "S1");
        assert_eq!(CLASSES[class_of(false, true)], "S2");
        assert_eq!(CLASSES[class_of(true, false)], "S3");
        assert_eq!(CLASSES[class_of(true, true)], "S4");
        assert_eq!(
            [S1, S2, S3, S4],
            [
                class_of(false, false),
                class_of(false, true),
                class_of(true, false),
                class_of(true, true)
            ]
        );
    }

    #[test]
    fn argmax_ties_take_lowest_index() {
        assert_eq!(argmax(&[0.25, 0.25, 0.25, 0.25]), 0);
        assert_eq!(argmax(&[0.1, 0.4, 0.4, 0.1]), 1);
        assert_eq!(argmax(&[0.1, 0.2, 0.3, 0.4]), 3);
        assert_eq!(argmax(&[f32::NAN, 0.2, 0.7, 0.1]), 2);
        assert_eq!(argmax(&[0.2, f32::NAN, 0.1, 0.1]), 0);
    }

    #[test]
    fn policies_map_probabilities_to_documented_decisions() {
        // (probs, always, optimistic, pessimistic)
        let cases: [([f32; 4], Decision, Decision, Decision); 6] = [
            ([0.7, 0.1, 0.1, 0.1], Retrieve, Retrieve, Skip), // S1 argmax
            ([0.1, 0.7, 0.1, 0.1], Retrieve, Retrieve, Retrieve), // S2 argmax
            ([0.1, 0.1, 0.7, 0.1], Retrieve, Skip, Skip),     // S3 argmax
            ([0.1, 0.1, 0.1, 0.7], Retrieve, Retrieve, Skip), // S4 argmax
            ([0.1, 0.4, 0.4, 0.1], Retrieve, Retrieve, Retrieve), // S2/S3 tie -> S2
            ([0.1, 0.1, 0.4, 0.4], Retrieve, Skip, Skip),     // S3/S4 tie -> S3
        ];
        for (probs, always, optimistic, pessimistic) in cases {
            assert_eq!(decide(Policy::Always, &probs), always, "{probs:?}");
            assert_eq!(decide(Policy::Optimistic, &probs), optimistic, "{probs:?}");
            assert_eq!(
                decide(Policy::Pessimistic, &probs),
                pessimistic,
                "{probs:?}"
            );
        }
        let p = [0.2, 0.3, 0.4, 0.1];
        assert_eq!(
            decide(Policy::Threshold(0.3), &p),
            Retrieve,
            "equality retrieves"
        );
        assert_eq!(decide(Policy::Threshold(0.30001), &p), Skip);
        assert_eq!(decide(Policy::Threshold(0.29), &p), Retrieve);
        assert_eq!(
            decide(Policy::Threshold(0.0), &[1.0, 0.0, 0.0, 0.0]),
            Retrieve
        );
        assert_eq!(
            decide(Policy::Threshold(1.0), &[0.0, 0.99, 0.0, 0.01]),
            Skip
        );
        assert_eq!(
            decide(Policy::Threshold(0.5), &[0.0, f32::NAN, 0.0, 0.0]),
            Skip
        );
        assert!(Retrieve.retrieves() && !Skip.retrieves());
    }

    #[test]
    fn policy_parses_and_serialises() {
        assert_eq!("always".parse::<Policy>(), Ok(Policy::Always));
        assert_eq!(" Optimistic ".parse::<Policy>(), Ok(Policy::Optimistic));
        assert_eq!("pessimistic".parse::<Policy>(), Ok(Policy::Pessimistic));
        assert_eq!(
            "threshold:0.3".parse::<Policy>(),
            Ok(Policy::Threshold(0.3))
        );
        assert_eq!("threshold: 1".parse::<Policy>(), Ok(Policy::Threshold(1.0)));
        for bad in [
            "",
            "never",
            "threshold",
            "threshold:",
            "threshold:x",
            "threshold:1.5",
        ] {
            let err = bad.parse::<Policy>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert!("threshold:-0.1"
            .parse::<Policy>()
            .unwrap_err()
            .contains("[0, 1]"));
        assert!("never"
            .parse::<Policy>()
            .unwrap_err()
            .contains("unknown gate policy"));

        for (p, json) in [
            (Policy::Always, r#""always""#),
            (Policy::Optimistic, r#""optimistic""#),
            (Policy::Pessimistic, r#""pessimistic""#),
            (Policy::Threshold(0.25), r#"{"threshold":0.25}"#),
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), json);
            assert_eq!(serde_json::from_str::<Policy>(json).unwrap(), p);
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
        }
        assert_eq!(
            serde_json::from_str::<Policy>(r#""threshold:0.5""#).unwrap(),
            Policy::Threshold(0.5)
        );
        assert!(serde_json::from_str::<Policy>(r#"{"threshold": 2.0}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#""sometimes""#).is_err());
        assert!(serde_json::from_str::<Policy>("3").is_err());
        assert_eq!(
            serde_json::to_string(&Decision::Retrieve).unwrap(),
            r#""retrieve""#
        );
        assert_eq!(
            serde_json::from_str::<Decision>(r#""skip""#).unwrap(),
            Decision::Skip
        );
    }
}
