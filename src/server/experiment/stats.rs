//! Exact per-arm sums for `GET /v1/ab/summary`. Prometheus histograms are for scraping and only
//! approximate; comparing arms needs the exact counts and means. Each store yields the same
//! [`ArmTotals`], so the summary reads alike whether one replica or many fed it.

use std::collections::VecDeque;

use serde::Serialize;

use super::arms::Arms;
use super::compare::{self, Difference, Moments, Verdict};

/// How many recent successful latencies the median is taken over (bounded memory).
pub const RECENT_LATENCIES: usize = 1024;

/// One arm's totals, as the summary needs them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ArmTotals {
    pub requests: u64,
    pub errors: u64,
    pub cancelled: u64,
    /// Latencies of successful responses, ms.
    pub latency: Moments,
    /// Median of the most recent [`RECENT_LATENCIES`] successful latencies.
    pub p50_ms: Option<f64>,
    pub feedback: u64,
    pub correct: u64,
    pub incorrect: u64,
    pub rating: Moments,
    /// Adaptation loss deltas of successful responses.
    pub loss_delta: Moments,
}

#[derive(Debug, Default)]
pub struct ArmStats {
    requests: u64,
    errors: u64,
    /// Requests whose client went away before the answer: counted apart from errors, so an
    /// arm whose users give up is seen as such instead of vanishing from the statistics.
    cancelled: u64,
    ok: u64,
    /// Latencies of successful responses.
    latency: Moments,
    recent_ms: VecDeque<f64>,
    feedback: u64,
    correct: u64,
    incorrect: u64,
    rating: Moments,
    loss_delta: Moments,
}

impl ArmStats {
    pub fn record(&mut self, ok: bool, ms: f64, loss_delta: Option<f64>) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
            return;
        }
        self.ok += 1;
        self.latency.add(ms);
        if self.recent_ms.len() == RECENT_LATENCIES {
            self.recent_ms.pop_front();
        }
        self.recent_ms.push_back(ms);
        if let Some(d) = loss_delta {
            self.loss_delta.add(d);
        }
    }

    pub fn record_cancelled(&mut self) {
        self.requests += 1;
        self.cancelled += 1;
    }

    pub fn record_feedback(&mut self, correct: Option<bool>, rating: Option<f64>) {
        self.feedback += 1;
        match correct {
            Some(true) => self.correct += 1,
            Some(false) => self.incorrect += 1,
            None => {}
        }
        if let Some(r) = rating {
            self.rating.add(r);
        }
    }

    fn median_ms(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.recent_ms.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        (!v.is_empty()).then(|| crate::numeric::quantile_sorted(&v, 0.5))
    }

    pub fn totals(&self) -> ArmTotals {
        ArmTotals {
            requests: self.requests,
            errors: self.errors,
            cancelled: self.cancelled,
            latency: self.latency,
            p50_ms: self.median_ms(),
            feedback: self.feedback,
            correct: self.correct,
            incorrect: self.incorrect,
            rating: self.rating,
            loss_delta: self.loss_delta,
        }
    }
}

fn share(k: u64, n: u64) -> Option<f64> {
    (n > 0).then(|| k as f64 / n as f64)
}

#[derive(Debug, Serialize)]
pub struct Latency {
    /// Over all successful responses.
    pub mean: Option<f64>,
    /// Over the most recent successful responses.
    pub p50: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct FeedbackSummary {
    pub count: u64,
    pub correct: u64,
    pub incorrect: u64,
    pub accuracy: Option<f64>,
    pub rating_mean: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ArmSummary {
    pub name: String,
    pub weight: f64,
    pub mode: String,
    pub requests: u64,
    pub errors: u64,
    pub cancelled: u64,
    pub latency_ms: Latency,
    pub feedback: FeedbackSummary,
    pub adapt_loss_delta_mean: Option<f64>,
    /// This arm against the baseline (the first arm); absent on the baseline itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_baseline: Option<Comparison>,
}

/// One arm against the baseline: differences are this arm's minus the baseline's.
#[derive(Debug, Serialize)]
pub struct Comparison {
    pub baseline: String,
    /// Feedback accuracy (share marked correct): Newcombe interval, Fisher's exact test.
    pub accuracy: Option<Difference>,
    /// Mean rating: Welch.
    pub rating: Option<Difference>,
    /// Mean latency of successful responses, ms: Welch.
    pub latency_ms: Option<Difference>,
    /// Whether both arms have the labelled feedback a verdict needs.
    pub enough_feedback: bool,
    pub min_feedback: u64,
    pub verdict: Verdict,
}

fn versus(baseline: &str, arm: &ArmTotals, base: &ArmTotals) -> Comparison {
    let labelled = (arm.correct + arm.incorrect, base.correct + base.incorrect);
    let accuracy = compare::accuracy((arm.correct, arm.incorrect), (base.correct, base.incorrect));
    let verdict = compare::verdict(accuracy.as_ref(), labelled);
    Comparison {
        baseline: baseline.to_string(),
        rating: compare::mean(&arm.rating, &base.rating),
        latency_ms: compare::mean(&arm.latency, &base.latency),
        enough_feedback: verdict != Verdict::InsufficientFeedback,
        min_feedback: compare::MIN_FEEDBACK,
        accuracy,
        verdict,
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub arms: Vec<ArmSummary>,
}

/// The summary of `arms` from their totals (in the same order).
pub fn summarize(arms: &Arms, totals: &[ArmTotals]) -> Summary {
    let arms = arms
        .iter()
        .zip(totals)
        .enumerate()
        .map(|(i, (a, s))| ArmSummary {
            name: a.name.clone(),
            weight: a.weight,
            mode: a.mode.clone(),
            requests: s.requests,
            errors: s.errors,
            cancelled: s.cancelled,
            latency_ms: Latency {
                mean: s.latency.mean(),
                p50: s.p50_ms,
            },
            feedback: FeedbackSummary {
                count: s.feedback,
                correct: s.correct,
                incorrect: s.incorrect,
                accuracy: share(s.correct, s.correct + s.incorrect),
                rating_mean: s.rating.mean(),
            },
            adapt_loss_delta_mean: s.loss_delta.mean(),
            vs_baseline: match (i, arms.get(0), totals.first()) {
                (1.., Some(b), Some(bs)) => Some(versus(&b.name, s, bs)),
                _ => None,
            },
        })
        .collect();
    Summary { arms }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_means_and_median() {
        let mut s = ArmStats::default();
        for ms in [30.0, 10.0, 20.0] {
            s.record(true, ms, Some(-0.5));
        }
        s.record(false, 1.0, None);
        s.record_cancelled();
        assert_eq!((s.requests, s.errors, s.cancelled), (5, 1, 1));
        assert_eq!(s.latency.mean(), Some(20.0));
        assert_eq!(s.median_ms(), Some(20.0));
        s.record(true, 40.0, None);
        assert_eq!(s.median_ms(), Some(25.0));
        assert_eq!(s.loss_delta.mean(), Some(-0.5));
        for _ in 0..2 * RECENT_LATENCIES {
            s.record(true, 1.0, None);
        }
        assert_eq!(s.recent_ms.len(), RECENT_LATENCIES);
        s.record_feedback(Some(true), Some(5.0));
        s.record_feedback(Some(false), None);
        s.record_feedback(None, Some(2.0));
        assert_eq!((s.feedback, s.correct, s.incorrect), (3, 1, 1));
        assert_eq!(s.rating.mean(), Some(3.5));
    }
}
