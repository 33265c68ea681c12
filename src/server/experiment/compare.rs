//! How sure the live A/B is: each arm against the baseline (the first arm). Arms serve different
//! users, so samples are independent, not paired as in the offline evaluation: accuracy
//! differences get Newcombe's interval (from Wilson score intervals, sound at small counts and
//! near 0 or 1) and Fisher's exact test; mean ratings and latencies get Welch's t interval and
//! test. The distributions come from `statrs`.

use serde::Serialize;
use statrs::distribution::{ContinuousCDF, StudentsT};
use statrs::stats_tests::{fishers_exact, Alternative};

/// Labelled feedback each of the two arms needs before a verdict is given.
pub const MIN_FEEDBACK: u64 = 30;

/// Two-sided level of the intervals and tests.
const ALPHA: f64 = 0.05;

/// 97.5 % quantile of the standard normal.
const Z: f64 = 1.959_963_984_540_054;

/// A difference (arm minus baseline) with its 95 % interval and two-sided p-value.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Difference {
    pub diff: f64,
    pub ci95: [f64; 2],
    pub p_value: f64,
}

/// Sums of one sample: count, sum and sum of squares.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Moments {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }

    /// The unbiased variance; `None` under two observations.
    fn variance(&self) -> Option<f64> {
        let n = self.n as f64;
        (self.n >= 2).then(|| ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0))
    }
}

/// Wilson score interval of `k` successes in `n`.
fn wilson(k: u64, n: u64) -> (f64, f64) {
    let (k, n) = (k as f64, n as f64);
    let p = k / n;
    let centre = (p + Z * Z / (2.0 * n)) / (1.0 + Z * Z / n);
    let half = Z / (1.0 + Z * Z / n) * (p * (1.0 - p) / n + Z * Z / (4.0 * n * n)).sqrt();
    (centre - half, centre + half)
}

/// Accuracy of `(correct, incorrect)` against the baseline's: `None` while either has no
/// labelled feedback.
pub fn accuracy(arm: (u64, u64), base: (u64, u64)) -> Option<Difference> {
    let (n1, n0) = (arm.0 + arm.1, base.0 + base.1);
    if n1 == 0 || n0 == 0 {
        return None;
    }
    let (p1, p0) = (arm.0 as f64 / n1 as f64, base.0 as f64 / n0 as f64);
    let (l1, u1) = wilson(arm.0, n1);
    let (l0, u0) = wilson(base.0, n0);
    let d = p1 - p0;
    // Newcombe (1998), method 10.
    let lo = d - ((p1 - l1).powi(2) + (u0 - p0).powi(2)).sqrt();
    let hi = d + ((u1 - p1).powi(2) + (p0 - l0).powi(2)).sqrt();
    let p_value = fishers_exact(&[arm.0, arm.1, base.0, base.1], Alternative::TwoSided)
        .unwrap_or(1.0)
        .min(1.0);
    Some(Difference {
        diff: d,
        ci95: [lo, hi],
        p_value,
    })
}

/// Mean of `arm` against the baseline's (Welch): `None` while either has under two values.
pub fn mean(arm: &Moments, base: &Moments) -> Option<Difference> {
    let (v1, v0) = (arm.variance()?, base.variance()?);
    let (n1, n0) = (arm.n as f64, base.n as f64);
    let d = arm.mean()? - base.mean()?;
    let (a, b) = (v1 / n1, v0 / n0);
    let se = (a + b).sqrt();
    if se == 0.0 {
        // Both samples constant: the difference is exact.
        let p_value = if d == 0.0 { 1.0 } else { 0.0 };
        return Some(Difference {
            diff: d,
            ci95: [d, d],
            p_value,
        });
    }
    let df = (a + b).powi(2) / (a * a / (n1 - 1.0) + b * b / (n0 - 1.0));
    let t = StudentsT::new(0.0, 1.0, df).ok()?;
    let q = t.inverse_cdf(1.0 - ALPHA / 2.0);
    let p_value = (2.0 * (1.0 - t.cdf((d / se).abs()))).min(1.0);
    Some(Difference {
        diff: d,
        ci95: [d - q * se, d + q * se],
        p_value,
    })
}

/// What the accuracy feedback says so far.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Under [`MIN_FEEDBACK`] labelled answers in one of the two arms.
    InsufficientFeedback,
    NoSignificantDifference,
    Better,
    Worse,
}

pub fn verdict(acc: Option<&Difference>, labelled: (u64, u64)) -> Verdict {
    match acc {
        _ if labelled.0 < MIN_FEEDBACK || labelled.1 < MIN_FEEDBACK => {
            Verdict::InsufficientFeedback
        }
        Some(d) if d.p_value < ALPHA && d.diff > 0.0 => Verdict::Better,
        Some(d) if d.p_value < ALPHA && d.diff < 0.0 => Verdict::Worse,
        _ => Verdict::NoSignificantDifference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() < tol
    }

    #[test]
    fn newcombes_worked_example_and_fishers_exact_test() {
        // Newcombe (1998), Table II, example (a): 56/70 against 48/80.
        let d = accuracy((56, 14), (48, 32)).unwrap();
        assert!(close(d.diff, 0.2, 1e-12), "{d:?}");
        assert!(
            close(d.ci95[0], 0.0524, 1e-4) && close(d.ci95[1], 0.3339, 1e-4),
            "{d:?}"
        );
        // Fisher's tea tasting: 3/4 against 1/4, two-sided p = 34/70.
        let d = accuracy((3, 1), (1, 3)).unwrap();
        assert!(close(d.p_value, 34.0 / 70.0, 1e-9), "{d:?}");
        assert_eq!(accuracy((0, 0), (1, 1)), None);
        // Identical arms: no difference, p = 1.
        let d = accuracy((10, 10), (10, 10)).unwrap();
        assert!(close(d.diff, 0.0, 1e-12) && close(d.p_value, 1.0, 1e-9));
        assert!(d.ci95[0] < 0.0 && d.ci95[1] > 0.0);
    }

    #[test]
    fn welchs_interval_and_test() {
        let sample = |xs: &[f64]| {
            let mut m = Moments::default();
            xs.iter().for_each(|&x| m.add(x));
            m
        };
        // y - x for x = 1..5 and y = 2, 4, .., 10: t = 1.897, df = 5.88, p = 0.1075.
        let x = sample(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        let y = sample(&[2.0, 4.0, 6.0, 8.0, 10.0]);
        let d = mean(&y, &x).unwrap();
        assert!(close(d.diff, 3.0, 1e-12));
        assert!(close(d.p_value, 0.1075, 1e-3), "{d:?}");
        assert!(d.ci95[0] < 0.0 && d.ci95[1] > 6.0 && close(d.ci95[0] + d.ci95[1], 6.0, 1e-9));
        assert_eq!(mean(&sample(&[1.0]), &x), None);
        let c = mean(&sample(&[2.0, 2.0]), &sample(&[2.0, 2.0])).unwrap();
        assert_eq!((c.diff, c.p_value), (0.0, 1.0));
    }

    #[test]
    fn a_verdict_needs_enough_feedback_and_significance() {
        let big = accuracy((80, 20), (50, 50)).unwrap();
        assert_eq!(verdict(Some(&big), (100, 100)), Verdict::Better);
        assert_eq!(
            verdict(Some(&big), (100, 29)),
            Verdict::InsufficientFeedback
        );
        let worse = accuracy((50, 50), (80, 20)).unwrap();
        assert_eq!(verdict(Some(&worse), (100, 100)), Verdict::Worse);
        let same = accuracy((50, 50), (52, 48)).unwrap();
        assert_eq!(
            verdict(Some(&same), (100, 100)),
            Verdict::NoSignificantDifference
        );
    }
}
