//! Statistics that keep an evaluation claim honest: bootstrap intervals for means and paired
//! differences, and McNemar's exact test for paired right/wrong outcomes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// A closed interval `[lo, hi]`; both bounds are NaN when it could not be computed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    const NAN: Interval = Interval {
        lo: f64::NAN,
        hi: f64::NAN,
    };
}

use crate::numeric::quantile_sorted;
pub use crate::numeric::{mean, quantile};

/// Percentile-bootstrap CI of the mean, seeded so a report can be reproduced exactly; NaN
/// bounds for empty input, zero resamples or a confidence outside (0, 1).
///
/// Bounds are clamped to the data's range (where every resample mean lies mathematically), so
/// rounding cannot make a constant input yield anything but `lo == hi == value`.
pub fn bootstrap_mean_ci(xs: &[f64], resamples: usize, confidence: f64, seed: u64) -> Interval {
    let n = xs.len();
    if n == 0 || resamples == 0 || !(confidence > 0.0 && confidence < 1.0) {
        return Interval::NAN;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut means: Vec<f64> = (0..resamples)
        .map(|_| (0..n).map(|_| xs[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let alpha = 1.0 - confidence;
    let (min, max) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| {
            (lo.min(x), hi.max(x))
        });
    Interval {
        lo: quantile_sorted(&means, alpha / 2.0).clamp(min, max),
        hi: quantile_sorted(&means, 1.0 - alpha / 2.0).clamp(min, max),
    }
}

/// CI of `mean(b) - mean(a)` resampling question indices jointly, which keeps each question's
/// pair together so per-question difficulty cancels; NaN if lengths differ or input is empty.
pub fn paired_bootstrap_diff_ci(
    a: &[f64],
    b: &[f64],
    resamples: usize,
    confidence: f64,
    seed: u64,
) -> Interval {
    if a.len() != b.len() || a.is_empty() {
        return Interval::NAN;
    }
    // Resampling indices jointly and differencing the means equals resampling the per-question
    // differences: mean over the resample of (b_i - a_i).
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| y - x).collect();
    bootstrap_mean_ci(&diffs, resamples, confidence, seed)
}

/// Paired right/wrong table of two systems on the same questions and McNemar's exact p-value.
#[derive(Debug, Clone, Serialize)]
pub struct McNemar {
    pub both_right: usize,
    pub right_to_wrong: usize,
    pub wrong_to_right: usize,
    pub both_wrong: usize,
    pub p_value: f64,
}

/// McNemar's exact test: only the questions the systems disagree on carry evidence, and under
/// no difference each disagreement is a fair coin, so p is a two-sided binomial tail
/// `min(1, 2 * P[X <= min(b, c)])`, X ~ Bin(b + c, 1/2); 1 when there are no disagreements.
/// Unequal lengths give zero counts and a NaN p-value.
pub fn mcnemar_exact(base: &[bool], other: &[bool]) -> McNemar {
    let mut t = McNemar {
        both_right: 0,
        right_to_wrong: 0,
        wrong_to_right: 0,
        both_wrong: 0,
        p_value: f64::NAN,
    };
    if base.len() != other.len() {
        return t;
    }
    for (&x, &y) in base.iter().zip(other) {
        match (x, y) {
            (true, true) => t.both_right += 1,
            (true, false) => t.right_to_wrong += 1,
            (false, true) => t.wrong_to_right += 1,
            (false, false) => t.both_wrong += 1,
        }
    }
    t.p_value = binomial_two_sided_half(t.right_to_wrong, t.wrong_to_right);
    t
}

/// `min(1, 2 * sum_{i<=k} C(n, i) / 2^n)` with n = b + c, k = min(b, c), in log space so that
/// large n neither overflows C(n, i) nor underflows 2^-n.
fn binomial_two_sided_half(b: usize, c: usize) -> f64 {
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    let k = b.min(c);
    // ln C(n, i) by the recurrence C(n, i) = C(n, i - 1) * (n - i + 1) / i.
    let mut log_terms = Vec::with_capacity(k + 1);
    let mut log_c = 0.0f64;
    log_terms.push(log_c);
    for i in 1..=k {
        log_c += ((n - i + 1) as f64).ln() - (i as f64).ln();
        log_terms.push(log_c);
    }
    // log-sum-exp; with k <= n/2 the terms increase, but take the max anyway.
    let max = log_terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = log_terms.iter().map(|&l| (l - max).exp()).sum();
    let log_tail = max + sum.ln() - n as f64 * std::f64::consts::LN_2;
    (std::f64::consts::LN_2 + log_tail).exp().min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// `b` right->wrong pairs then `c` wrong->right pairs, plus some concordant padding.
    fn pairs(b: usize, c: usize, both_right: usize, both_wrong: usize) -> (Vec<bool>, Vec<bool>) {
        let mut base = Vec::new();
        let mut other = Vec::new();
        for _ in 0..b {
            base.push(true);
            other.push(false);
        }
        for _ in 0..c {
            base.push(false);
            other.push(true);
        }
        for _ in 0..both_right {
            base.push(true);
            other.push(true);
        }
        for _ in 0..both_wrong {
            base.push(false);
            other.push(false);
        }
        (base, other)
    }

    #[test]
    fn mean_basic_and_empty() {
        // (1 + 2 + 3 + 4) / 4 = 2.5
        assert_eq!(mean(&[1.0, 2.0, 3.0, 4.0]), 2.5);
        assert_eq!(mean(&[-3.0]), -3.0);
        assert!(mean(&[]).is_nan());
    }

    #[test]
    fn quantile_linear_interpolation() {
        // [1,2,3,4], q=0.5: h = 3 * 0.5 = 1.5 -> x[1] + 0.5 * (x[2] - x[1]) = 2 + 0.5 = 2.5
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.5);
        // 1..=20, q=0.95: h = 19 * 0.95 = 18.05 -> x[18] + 0.05 * (x[19] - x[18]) = 19.05
        let xs: Vec<f64> = (1..=20).map(f64::from).collect();
        assert!(close(quantile(&xs, 0.95), 19.05, 1e-12));
        // Endpoints are min and max; input order does not matter (sorted copy).
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.0), 1.0);
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 1.0), 4.0);
        // [10, 20, 30], q=0.25: h = 2 * 0.25 = 0.5 -> 10 + 0.5 * 10 = 15
        assert_eq!(quantile(&[30.0, 10.0, 20.0], 0.25), 15.0);
        // Single element: every quantile is that element.
        assert_eq!(quantile(&[7.0], 0.3), 7.0);
    }

    #[test]
    fn quantile_degenerate_inputs() {
        assert!(quantile(&[], 0.5).is_nan());
        assert!(quantile(&[1.0, 2.0], -0.1).is_nan());
        assert!(quantile(&[1.0, 2.0], 1.1).is_nan());
        assert!(quantile(&[1.0, 2.0], f64::NAN).is_nan());
    }

    #[test]
    fn bootstrap_is_deterministic_per_seed() {
        let xs: Vec<f64> = (0..200).map(|i| ((i * 37) % 11) as f64).collect();
        let a = bootstrap_mean_ci(&xs, 500, 0.95, 42);
        let b = bootstrap_mean_ci(&xs, 500, 0.95, 42);
        assert_eq!(a, b);
        let c = bootstrap_mean_ci(&xs, 500, 0.95, 43);
        assert_ne!(a, c);
    }

    #[test]
    fn bootstrap_contains_sample_mean_and_shrinks_with_n() {
        // Same 0/1 pattern (30% ones) at n = 100 and n = 1000.
        let make =
            |n: usize| -> Vec<f64> { (0..n).map(|i| if i % 10 < 3 { 1.0 } else { 0.0 }).collect() };
        let small = make(100);
        let large = make(1000);
        let ci_s = bootstrap_mean_ci(&small, 2000, 0.95, 7);
        let ci_l = bootstrap_mean_ci(&large, 2000, 0.95, 7);
        for (ci, xs) in [(ci_s, &small), (ci_l, &large)] {
            let m = mean(xs);
            assert!(ci.lo <= m && m <= ci.hi, "{ci:?} vs {m}");
        }
        // Width ~ 2 * 1.96 * sqrt(0.21 / n): ~0.18 at n=100, ~0.057 at n=1000.
        let ws = ci_s.hi - ci_s.lo;
        let wl = ci_l.hi - ci_l.lo;
        assert!(wl < ws / 2.0, "{ws} vs {wl}");
    }

    #[test]
    fn bootstrap_half_ones_over_1000_is_about_3_points() {
        // p = 0.5, n = 1000: SE = sqrt(0.25 / 1000) = 0.0158; 1.96 * SE = 0.031.
        // So roughly [0.469, 0.531].
        let xs: Vec<f64> = (0..1000).map(|i| (i % 2) as f64).collect();
        let ci = bootstrap_mean_ci(&xs, 2000, 0.95, 1);
        assert!((0.46..=0.48).contains(&ci.lo), "{ci:?}");
        assert!((0.52..=0.54).contains(&ci.hi), "{ci:?}");
    }

    #[test]
    fn bootstrap_constant_and_degenerate_inputs() {
        // 0.1 summed 37 times is not exactly 3.7 in floating point; the clamp keeps it exact.
        let xs = vec![0.1; 37];
        let ci = bootstrap_mean_ci(&xs, 200, 0.95, 3);
        assert_eq!(ci, Interval { lo: 0.1, hi: 0.1 });
        let one = bootstrap_mean_ci(&[5.0], 100, 0.9, 3);
        assert_eq!(one, Interval { lo: 5.0, hi: 5.0 });
        for ci in [
            bootstrap_mean_ci(&[], 100, 0.95, 0),
            bootstrap_mean_ci(&[1.0, 2.0], 0, 0.95, 0),
            bootstrap_mean_ci(&[1.0, 2.0], 100, 1.0, 0),
            bootstrap_mean_ci(&[1.0, 2.0], 100, 0.0, 0),
        ] {
            assert!(ci.lo.is_nan() && ci.hi.is_nan(), "{ci:?}");
        }
    }

    #[test]
    fn paired_diff_ci_basic() {
        // b = a + 0.2 on every question: every resampled difference of means is exactly 0.2.
        let a: Vec<f64> = (0..50).map(|i| (i % 3) as f64 * 0.25).collect();
        let b: Vec<f64> = a.iter().map(|x| x + 0.2).collect();
        let ci = paired_bootstrap_diff_ci(&a, &b, 300, 0.95, 9);
        assert!(close(ci.lo, 0.2, 1e-9) && close(ci.hi, 0.2, 1e-9), "{ci:?}");

        // b fixes 100 of 1000 wrong answers in a: diff mean = 0.1; SE ~ sqrt(0.09 / 1000) = 0.0095
        // (per-question diffs are 0/1 with p = 0.1), so the CI is about 0.1 +- 0.019.
        let a: Vec<f64> = (0..1000)
            .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        let b: Vec<f64> = (0..1000)
            .map(|i| if i % 2 == 0 || i % 10 == 1 { 1.0 } else { 0.0 })
            .collect();
        let ci = paired_bootstrap_diff_ci(&a, &b, 2000, 0.95, 11);
        assert!(ci.lo > 0.07 && ci.lo < 0.09, "{ci:?}");
        assert!(ci.hi > 0.11 && ci.hi < 0.13, "{ci:?}");
        // Same seed, same answer.
        assert_eq!(ci, paired_bootstrap_diff_ci(&a, &b, 2000, 0.95, 11));
    }

    #[test]
    fn paired_diff_ci_degenerate_inputs() {
        let bad = paired_bootstrap_diff_ci(&[1.0, 2.0], &[1.0], 100, 0.95, 0);
        assert!(bad.lo.is_nan() && bad.hi.is_nan());
        let empty = paired_bootstrap_diff_ci(&[], &[], 100, 0.95, 0);
        assert!(empty.lo.is_nan() && empty.hi.is_nan());
    }

    #[test]
    fn mcnemar_counts_and_small_exact_p() {
        // b = 1, c = 5: n = 6, k = 1: 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64 = 14/64 = 0.21875
        let (base, other) = pairs(1, 5, 3, 2);
        let m = mcnemar_exact(&base, &other);
        assert_eq!(
            (
                m.both_right,
                m.right_to_wrong,
                m.wrong_to_right,
                m.both_wrong
            ),
            (3, 1, 5, 2)
        );
        assert!(close(m.p_value, 0.21875, 1e-12), "{m:?}");

        // Symmetric in direction: b = 5, c = 1 gives the same p.
        let (base, other) = pairs(5, 1, 0, 0);
        assert!(close(mcnemar_exact(&base, &other).p_value, 0.21875, 1e-12));

        // b = 0, c = 10: n = 10, k = 0: 2 * C(10,0) / 2^10 = 2/1024 = 0.001953125
        let (base, other) = pairs(0, 10, 4, 4);
        assert!(close(
            mcnemar_exact(&base, &other).p_value,
            2.0 / 1024.0,
            1e-15
        ));

        // b = 2, c = 8: n = 10, k = 2: 2 * (1 + 10 + 45) / 1024 = 112/1024 = 0.109375
        let (base, other) = pairs(2, 8, 0, 0);
        assert!(close(mcnemar_exact(&base, &other).p_value, 0.109375, 1e-12));
    }

    #[test]
    fn mcnemar_equal_discordant_clips_to_one() {
        // b = c = 3: n = 6, k = 3: 2 * (1 + 6 + 15 + 20) / 64 = 84/64 > 1 -> 1
        let (base, other) = pairs(3, 3, 1, 1);
        assert_eq!(mcnemar_exact(&base, &other).p_value, 1.0);
        // No discordant pairs at all: p = 1 by definition.
        let (base, other) = pairs(0, 0, 5, 5);
        assert_eq!(mcnemar_exact(&base, &other).p_value, 1.0);
        assert_eq!(mcnemar_exact(&[], &[]).p_value, 1.0);
    }

    #[test]
    fn mcnemar_large_n_is_finite() {
        // b = 4000, c = 4100: n = 8100. Normal approximation with continuity correction:
        // z = (|c - b| - 1) / sqrt(n) = 99 / 90 = 1.1, two-sided p = 2 * (1 - Phi(1.1)) ~ 0.271.
        let (base, other) = pairs(4000, 4100, 0, 0);
        let p = mcnemar_exact(&base, &other).p_value;
        assert!(p.is_finite() && p > 0.0 && p <= 1.0, "{p}");
        assert!(p > 0.25 && p < 0.30, "{p}");

        // n = 100000 with a big imbalance: b = 49000, c = 51000.
        // z = 1999 / sqrt(100000) = 6.32 -> p ~ 2.6e-10: tiny but positive, not 0 or NaN.
        let (base, other) = pairs(49_000, 51_000, 0, 0);
        let p = mcnemar_exact(&base, &other).p_value;
        assert!(p.is_finite() && p > 0.0 && p < 1e-8, "{p}");
    }

    #[test]
    fn mcnemar_unequal_lengths() {
        let m = mcnemar_exact(&[true, false], &[true]);
        assert!(m.p_value.is_nan());
        assert_eq!(
            (
                m.both_right,
                m.right_to_wrong,
                m.wrong_to_right,
                m.both_wrong
            ),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn interval_serializes() {
        let s = serde_json::to_string(&Interval { lo: 0.25, hi: 0.5 }).unwrap();
        assert_eq!(s, r#"{"lo":0.25,"hi":0.5}"#);
    }
}
