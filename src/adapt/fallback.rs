//! Why an adaptation was skipped, cut short or discarded: one enum, so metrics label it by
//! kind and the response still reads as a sentence (`rag.tta.fallback`).

use std::fmt;

use serde::{Serialize, Serializer};

#[derive(Debug, Clone, PartialEq)]
pub enum Fallback {
    /// The retrieved text gave no training pairs: answered unadapted.
    NoPairs,
    /// `[tta] time_budget_ms` ran out after `done` of `steps` steps; the adapter keeps them.
    TimeBudget {
        budget_ms: f64,
        done: usize,
        steps: usize,
    },
    /// A step's loss was NaN or infinite: answered unadapted.
    NonFiniteLoss(f64),
    /// The adapted model's loss was not finite: answered unadapted.
    Diverged,
}

impl Fallback {
    /// The bounded label of metrics (`ttarag_arm_fallbacks_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoPairs => "no_pairs",
            Self::TimeBudget { .. } => "time_budget",
            Self::NonFiniteLoss(_) => "non_finite_loss",
            Self::Diverged => "diverged",
        }
    }
}

impl fmt::Display for Fallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoPairs => write!(f, "no training pairs"),
            Self::TimeBudget {
                budget_ms,
                done,
                steps,
            } => write!(
                f,
                "time budget of {budget_ms:.0} ms reached after {done} of {steps} steps"
            ),
            Self::NonFiniteLoss(v) => {
                write!(f, "non-finite loss ({v}); answered without adaptation")
            }
            Self::Diverged => write!(f, "adapted model diverged; answered without adaptation"),
        }
    }
}

/// Serialised as its sentence, as the API has always reported it.
impl Serialize for Fallback {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentences_and_labels() {
        let t = Fallback::TimeBudget {
            budget_ms: 20000.0,
            done: 1,
            steps: 3,
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            "time budget of 20000 ms reached after 1 of 3 steps"
        );
        assert_eq!(t.label(), "time_budget");
        assert_eq!(Fallback::NoPairs.to_string(), "no training pairs");
        assert_eq!(Fallback::NonFiniteLoss(f64::NAN).label(), "non_finite_loss");
        assert_eq!(Fallback::Diverged.label(), "diverged");
    }
}
