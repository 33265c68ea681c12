//! Small numeric helpers that serving and the lab share, each defined once: the mean, the
//! quantile (numpy's default interpolation, so a reader can recompute any figure), the median
//! and the argmax.

/// Arithmetic mean; NaN for an empty slice, since "no data" must not read as a score of 0.
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

/// Quantile by linear interpolation between closest ranks (numpy's default), so numbers match
/// what a reader recomputes in Python; NaN for empty input or q outside [0, 1].
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() || !(0.0..=1.0).contains(&q) {
        return f64::NAN;
    }
    let mut sorted = xs.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile_sorted(&sorted, q)
}

/// [`quantile`] of an already sorted slice (non-empty, q in [0, 1]).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * q;
    let i = h.floor() as usize;
    let frac = h - i as f64;
    match sorted.get(i + 1) {
        Some(&next) if frac > 0.0 => sorted[i] + frac * (next - sorted[i]),
        _ => sorted[i],
    }
}

/// The median: [`quantile`] at one half (the mean of the two middle values of an even count).
pub fn median(xs: &[f64]) -> f64 {
    quantile(xs, 0.5)
}

/// Index of the largest finite value, first on ties so the order breaks ties
/// deterministically; NaN and infinities are ignored (a failed score, a broken probability).
/// `None` when no value is finite.
pub fn argmax<T: Copy + Into<f64>>(xs: &[T]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, &s) in xs.iter().enumerate() {
        let s: f64 = s.into();
        if !s.is_finite() {
            continue;
        }
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}
