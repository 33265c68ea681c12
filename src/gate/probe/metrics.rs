//! How well a classifier does: accuracy, confusion, macro-F1, the majority baseline, and the
//! stratified split the gate's training and sweep evaluate on.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Fraction of positions where `pred` equals `gold` (0 for empty input).
///
/// # Panics
/// If the lengths differ.
pub fn accuracy(pred: &[usize], gold: &[usize]) -> f64 {
    assert_eq!(
        pred.len(),
        gold.len(),
        "accuracy: prediction/gold lengths differ"
    );
    if gold.is_empty() {
        return 0.0;
    }
    pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64 / gold.len() as f64
}

/// Confusion counts: `m[gold][pred]`.
///
/// # Panics
/// If the lengths differ or a label is not below `classes`.
pub fn confusion_matrix(pred: &[usize], gold: &[usize], classes: usize) -> Vec<Vec<usize>> {
    assert_eq!(
        pred.len(),
        gold.len(),
        "confusion: prediction/gold lengths differ"
    );
    let mut m = vec![vec![0usize; classes]; classes];
    for (&p, &g) in pred.iter().zip(gold) {
        assert!(
            p < classes && g < classes,
            "label {p}/{g} not below {classes}"
        );
        m[g][p] += 1;
    }
    m
}

/// Unweighted mean of the per-class F1 (`2 tp / (2 tp + fp + fn)`) over the classes that occur
/// in `pred` or `gold`; classes absent from both are left out of the mean. 0 for empty input.
///
/// # Panics
/// If the lengths differ or a label is not below `classes`.
pub fn macro_f1(pred: &[usize], gold: &[usize], classes: usize) -> f64 {
    let m = confusion_matrix(pred, gold, classes);
    let mut sum = 0.0;
    let mut counted = 0usize;
    for (c, row) in m.iter().enumerate() {
        let tp = row[c];
        let fn_ = row.iter().sum::<usize>() - tp;
        let fp = m.iter().map(|r| r[c]).sum::<usize>() - tp;
        if tp + fp + fn_ == 0 {
            continue;
        }
        sum += 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64;
        counted += 1;
    }
    if counted == 0 {
        0.0
    } else {
        sum / counted as f64
    }
}

/// The most frequent class in `train` (ties: lowest index; 0 when empty) and the accuracy of
/// always predicting it on `eval_gold`.
pub fn majority_baseline(train: &[usize], eval_gold: &[usize]) -> (usize, f64) {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for &c in train {
        *counts.entry(c).or_default() += 1;
    }
    let mut majority = (0usize, 0usize);
    for (&c, &n) in &counts {
        if n > majority.1 {
            majority = (c, n);
        }
    }
    let class = majority.0;
    (class, accuracy(&vec![class; eval_gold.len()], eval_gold))
}

/// Splits example indices into (train, val), each class separately: a class with `n` examples
/// sends `round(n * val_fraction)` of them (chosen by a seeded shuffle) to validation, at least
/// one and at most `n - 1` when `n >= 2` and `val_fraction > 0`; a single-example class stays in
/// training. Both index lists come back sorted.
///
/// # Panics
/// If `val_fraction` is not within `[0, 1]`.
pub fn stratified_split(
    labels: &[usize],
    val_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    assert!(
        (0.0..=1.0).contains(&val_fraction),
        "stratified_split: val_fraction must be in [0, 1], got {val_fraction}"
    );
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &c) in labels.iter().enumerate() {
        by_class.entry(c).or_default().push(i);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (_, mut idx) in by_class {
        idx.shuffle(&mut rng);
        let n = idx.len();
        let mut n_val = (n as f64 * val_fraction).round() as usize;
        if n >= 2 && val_fraction > 0.0 {
            n_val = n_val.clamp(1, n - 1);
        } else if n < 2 {
            n_val = 0;
        }
        val.extend_from_slice(&idx[..n_val]);
        train.extend_from_slice(&idx[n_val..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}
