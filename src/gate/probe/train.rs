//! Training the gate's probe (`ttarag gate train`): standardisation fitted on the training
//! split, seeded initialisation and shuffling, AdamW, early stopping on the class-weighted
//! validation loss keeping the best epoch's weights.

use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::metrics::{accuracy, macro_f1};
use super::*;

/// Training settings; every field has a default (`#[serde(default)]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainOptions {
    /// AdamW learning rate (default 1e-3).
    pub lr: f64,
    /// AdamW decoupled weight decay, applied to weight matrices only (default 0.01).
    pub weight_decay: f64,
    /// Maximum number of epochs (default 200).
    pub epochs: usize,
    /// Mini-batch size (default 32).
    pub batch_size: usize,
    /// Stop after this many epochs without a lower validation loss (default 10; 0 = never stop
    /// early, train all `epochs`).
    pub patience: usize,
    /// One weight per class for the cross-entropy (training and validation loss). `None` =
    /// inverse class frequency on the training split, normalised to mean 1 over the classes
    /// present there; classes absent from the training split get weight 1.
    pub class_weights: Option<Vec<f32>>,
    /// Dropout probability after the hidden layer, MLP only, in `[0, 1)` (default 0.1).
    pub dropout: f32,
    /// Seed for initialisation, shuffling and dropout masks.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            weight_decay: 0.01,
            epochs: 200,
            batch_size: 32,
            patience: 10,
            class_weights: None,
            dropout: 0.1,
            seed: 0,
        }
    }
}

/// What training did. Epochs are counted from 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Epochs trained (less than `TrainOptions::epochs` when early stopping triggered).
    pub epochs_run: usize,
    /// The epoch whose weights were kept (lowest validation loss).
    pub best_epoch: usize,
    /// Class-weighted cross-entropy of the returned probe on the whole training split (no
    /// dropout).
    pub train_loss: f64,
    /// Class-weighted cross-entropy on the validation split at `best_epoch`.
    pub val_loss: f64,
    /// Validation accuracy of the returned probe.
    pub val_accuracy: f64,
    /// Validation macro-F1 of the returned probe (see [`macro_f1`]).
    pub val_macro_f1: f64,
    /// The class weights the losses used.
    pub class_weights: Vec<f32>,
    /// Validation loss after each epoch (`val_loss_history[e - 1]` for epoch `e`).
    pub val_loss_history: Vec<f64>,
}

/// Class-weighted mean cross-entropy: `-sum_i w_i log p_i[y_i] / weight_sum`, with `logits`
/// `(n, classes)`, `labels` u32 `(n)`, per-example weights `(n)`. Built from
/// `candle_nn::ops::log_softmax` (max, sub, exp, sum, log: all with backward; the max term's
/// gradient cancels) and `gather`, so gradients reach the logits.
fn weighted_ce(
    logits: &Tensor,
    labels: &Tensor,
    weights: &Tensor,
    weight_sum: f64,
) -> candle_core::Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?;
    (picked * weights)?
        .sum_all()?
        .affine(-1.0 / weight_sum, 0.0)
}

fn check_labels(y: &[usize], classes: usize, what: &str) -> Result<()> {
    if let Some((i, &c)) = y.iter().enumerate().find(|(_, &c)| c >= classes) {
        bail!("{what}: label {c} at row {i} is not below the class count {classes}");
    }
    Ok(())
}

/// Labels, per-example weights and their sum for a set of rows.
struct Targets {
    labels: Tensor,
    weights: Tensor,
    weight_sum: f64,
}

impl Targets {
    fn new(y: &[usize], class_weights: &[f32], device: &Device) -> Result<Self> {
        let w: Vec<f32> = y.iter().map(|&c| class_weights[c]).collect();
        let weight_sum = w.iter().map(|&v| v as f64).sum();
        let labels: Vec<u32> = y.iter().map(|&c| c as u32).collect();
        Ok(Self {
            labels: Tensor::from_vec(labels, y.len(), device)?,
            weights: Tensor::from_vec(w, y.len(), device)?,
            weight_sum,
        })
    }
}

/// Inverse class frequency over `y`, normalised to mean 1 over the classes present; absent
/// classes get 1.
fn inverse_frequency(y: &[usize], classes: usize) -> Vec<f32> {
    let mut counts = vec![0usize; classes];
    for &c in y {
        counts[c] += 1;
    }
    let inv: Vec<f64> = counts
        .iter()
        .map(|&n| if n > 0 { 1.0 / n as f64 } else { 0.0 })
        .collect();
    let present = counts.iter().filter(|&&n| n > 0).count().max(1);
    let mean = inv.iter().sum::<f64>() / present as f64;
    counts
        .iter()
        .zip(&inv)
        .map(|(&n, &v)| if n > 0 { (v / mean) as f32 } else { 1.0 })
        .collect()
}

/// Uniform values in `(-bound, bound)` from the seeded RNG.
fn uniform(rng: &mut StdRng, shape: (usize, usize), bound: f64, device: &Device) -> Result<Var> {
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, device)?)?)
}

/// A real copy of a variable's current value (`Var::set` writes in place, so a clone would
/// follow later updates), detached from the graph.
fn snapshot(v: &Var) -> Result<Tensor> {
    Ok(v.as_tensor().copy()?.detach())
}

/// Trains a probe on `x_train`/`y_train`, early-stopping on `x_val`/`y_val` (both non-empty).
///
/// `x_*` are feature rows (all of the same length), `y_*` class indices below `classes`
/// (at least 2). The probe lives on `device` and computes in f32. Deterministic for a given
/// `opts.seed` on a given device.
#[allow(clippy::too_many_arguments)]
pub fn train(
    x_train: &[Vec<f32>],
    y_train: &[usize],
    x_val: &[Vec<f32>],
    y_val: &[usize],
    classes: usize,
    kind: ProbeKind,
    opts: &TrainOptions,
    device: &Device,
) -> Result<(Probe, TrainReport)> {
    ensure!(
        classes >= 2,
        "gate probe: need at least 2 classes, got {classes}"
    );
    ensure!(
        !x_train.is_empty(),
        "gate probe: the training split is empty"
    );
    ensure!(
        !x_val.is_empty(),
        "gate probe: the validation split is empty (early stopping needs one; see \
         stratified_split)"
    );
    ensure!(
        x_train.len() == y_train.len(),
        "gate probe: {} training rows but {} labels",
        x_train.len(),
        y_train.len()
    );
    ensure!(
        x_val.len() == y_val.len(),
        "gate probe: {} validation rows but {} labels",
        x_val.len(),
        y_val.len()
    );
    let dim = x_train[0].len();
    ensure!(dim > 0, "gate probe: feature rows are empty");
    ensure!(
        opts.lr.is_finite() && opts.lr > 0.0,
        "gate probe: lr must be positive, got {}",
        opts.lr
    );
    ensure!(
        opts.weight_decay.is_finite() && opts.weight_decay >= 0.0,
        "gate probe: weight_decay must be >= 0, got {}",
        opts.weight_decay
    );
    ensure!(opts.epochs >= 1, "gate probe: epochs must be at least 1");
    ensure!(
        opts.batch_size >= 1,
        "gate probe: batch_size must be at least 1"
    );
    ensure!(
        (0.0..1.0).contains(&opts.dropout),
        "gate probe: dropout must be in [0, 1), got {}",
        opts.dropout
    );
    if let ProbeKind::Mlp { hidden } = kind {
        ensure!(
            hidden >= 1,
            "gate probe: the MLP hidden width must be at least 1"
        );
    }
    check_labels(y_train, classes, "gate probe training labels")?;
    check_labels(y_val, classes, "gate probe validation labels")?;
    let train_flat = flatten(x_train, dim, "gate probe training features")?;
    let val_flat = flatten(x_val, dim, "gate probe validation features")?;

    let class_weights = match &opts.class_weights {
        Some(w) => {
            ensure!(
                w.len() == classes,
                "gate probe: {} class weights for {classes} classes",
                w.len()
            );
            ensure!(
                w.iter().all(|v| v.is_finite() && *v >= 0.0),
                "gate probe: class weights must be finite and >= 0, got {w:?}"
            );
            w.clone()
        }
        None => inverse_frequency(y_train, classes),
    };

    // Standardisation fitted on the training split (f64 accumulation).
    let n = x_train.len();
    let mut mean = vec![0f64; dim];
    for row in x_train {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let mut var = vec![0f64; dim];
    for row in x_train {
        for ((s, &v), &m) in var.iter_mut().zip(row).zip(&mean) {
            *s += (v as f64 - m).powi(2);
        }
    }
    let std: Vec<f32> = var
        .iter()
        .map(|&s| ((s / n as f64).sqrt() as f32).max(STD_FLOOR))
        .collect();
    let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let mean = Tensor::from_vec(mean, dim, device)?;
    let std = Tensor::from_vec(std, dim, device)?;
    let standardise = |flat: Vec<f32>, rows: usize| -> Result<Tensor> {
        Ok(Tensor::from_vec(flat, (rows, dim), device)?
            .broadcast_sub(&mean)?
            .broadcast_div(&std)?)
    };
    let xt = standardise(train_flat, n)?;
    let xv = standardise(val_flat, x_val.len())?;
    let tt = Targets::new(y_train, &class_weights, device)?;
    let tv = Targets::new(y_val, &class_weights, device)?;
    ensure!(
        tt.weight_sum > 0.0,
        "gate probe: the training labels carry zero total class weight"
    );
    ensure!(
        tv.weight_sum > 0.0,
        "gate probe: the validation labels carry zero total class weight"
    );

    // Seeded initialisation: Kaiming-uniform before a ReLU, Xavier-uniform otherwise; zero
    // biases.
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let (hidden, out_in) = match kind {
        ProbeKind::Logistic => (None, dim),
        ProbeKind::Mlp { hidden } => {
            let w = uniform(&mut rng, (hidden, dim), (6.0 / dim as f64).sqrt(), device)?;
            let b = Var::zeros(hidden, DType::F32, device)?;
            (Some((w, b)), hidden)
        }
    };
    let out_w = uniform(
        &mut rng,
        (classes, out_in),
        (6.0 / (out_in + classes) as f64).sqrt(),
        device,
    )?;
    let out_b = Var::zeros(classes, DType::F32, device)?;

    let mut weights = vec![out_w.clone()];
    let mut biases = vec![out_b.clone()];
    if let Some((w, b)) = &hidden {
        weights.push(w.clone());
        biases.push(b.clone());
    }
    let params = |weight_decay| ParamsAdamW {
        lr: opts.lr,
        weight_decay,
        ..ParamsAdamW::default()
    };
    let mut opt_w = AdamW::new(weights, params(opts.weight_decay))?;
    let mut opt_b = AdamW::new(biases, params(0.0))?;

    let logits_of = |x: &Tensor, mask: Option<&Tensor>| {
        forward(
            x,
            hidden.as_ref().map(|(w, b)| (w.as_tensor(), b.as_tensor())),
            (out_w.as_tensor(), out_b.as_tensor()),
            mask,
        )
    };
    let hidden_width = hidden.as_ref().map(|(w, _)| w.dims()[0]);
    let use_dropout = hidden_width.is_some() && opts.dropout > 0.0;
    let keep_scale = 1.0 / (1.0 - opts.dropout);

    let mut order: Vec<usize> = (0..n).collect();
    let mut history = Vec::new();
    let mut best: Option<(usize, f64, Vec<Tensor>)> = None;
    let mut since_best = 0usize;
    for epoch in 1..=opts.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(opts.batch_size) {
            let weight_sum: f64 = batch
                .iter()
                .map(|&i| class_weights[y_train[i]] as f64)
                .sum();
            if weight_sum <= 0.0 {
                continue;
            }
            let idx: Vec<u32> = batch.iter().map(|&i| i as u32).collect();
            let idx = Tensor::from_vec(idx, batch.len(), device)?;
            let xb = xt.index_select(&idx, 0)?;
            let mask = match hidden_width {
                Some(h) if use_dropout => {
                    let m: Vec<f32> = (0..batch.len() * h)
                        .map(|_| {
                            if rng.random::<f32>() < opts.dropout {
                                0.0
                            } else {
                                keep_scale
                            }
                        })
                        .collect();
                    Some(Tensor::from_vec(m, (batch.len(), h), device)?)
                }
                _ => None,
            };
            let logits = logits_of(&xb, mask.as_ref())?;
            let loss = weighted_ce(
                &logits,
                &tt.labels.index_select(&idx, 0)?,
                &tt.weights.index_select(&idx, 0)?,
                weight_sum,
            )?;
            let grads = loss.backward()?;
            opt_w.step(&grads)?;
            opt_b.step(&grads)?;
        }

        let val_loss = weighted_ce(
            &logits_of(&xv, None)?,
            &tv.labels,
            &tv.weights,
            tv.weight_sum,
        )?
        .to_scalar::<f32>()? as f64;
        history.push(val_loss);
        if val_loss.is_finite() && best.as_ref().is_none_or(|(_, b, _)| val_loss < *b) {
            let mut copies = vec![snapshot(&out_w)?, snapshot(&out_b)?];
            if let Some((w, b)) = &hidden {
                copies.push(snapshot(w)?);
                copies.push(snapshot(b)?);
            }
            best = Some((epoch, val_loss, copies));
            since_best = 0;
        } else {
            since_best += 1;
            if opts.patience > 0 && since_best >= opts.patience {
                break;
            }
        }
    }
    let epochs_run = history.len();
    let Some((best_epoch, val_loss, mut copies)) = best else {
        bail!(
            "gate probe: the validation loss was never finite ({:?}); lower the learning rate",
            history.last()
        );
    };
    let hidden = if copies.len() == 4 {
        let bias = copies.pop().expect("four copies");
        let weight = copies.pop().expect("four copies");
        Some(Linear { weight, bias })
    } else {
        None
    };
    let (out_bias, out_weight) = (copies.pop(), copies.pop());
    let probe = Probe {
        kind,
        input_dim: dim,
        classes,
        mean,
        std,
        hidden,
        out: Linear {
            weight: out_weight.context("gate probe: missing output weight")?,
            bias: out_bias.context("gate probe: missing output bias")?,
        },
    };

    let train_loss = probe.weighted_cross_entropy(x_train, y_train, &class_weights)?;
    let pred = probe.predict(x_val)?;
    let report = TrainReport {
        epochs_run,
        best_epoch,
        train_loss,
        val_loss,
        val_accuracy: accuracy(&pred, y_val),
        val_macro_f1: macro_f1(&pred, y_val, classes),
        class_weights,
        val_loss_history: history,
    };
    tracing::debug!(
        epochs_run,
        best_epoch,
        val_loss,
        val_accuracy = report.val_accuracy,
        "gate probe trained"
    );
    Ok((probe, report))
}

impl Probe {
    /// Class-weighted mean cross-entropy of the probe on `x`/`y` (the loss training
    /// minimises and early-stops on).
    pub fn weighted_cross_entropy(
        &self,
        x: &[Vec<f32>],
        y: &[usize],
        class_weights: &[f32],
    ) -> Result<f64> {
        ensure!(
            x.len() == y.len() && !x.is_empty(),
            "gate probe loss: {} rows and {} labels (need equal, non-zero counts)",
            x.len(),
            y.len()
        );
        ensure!(
            class_weights.len() == self.classes,
            "gate probe loss: {} class weights for {} classes",
            class_weights.len(),
            self.classes
        );
        check_labels(y, self.classes, "gate probe loss labels")?;
        let t = Targets::new(y, class_weights, self.device())?;
        ensure!(
            t.weight_sum > 0.0,
            "gate probe loss: zero total class weight"
        );
        let loss = weighted_ce(&self.logits(x)?, &t.labels, &t.weights, t.weight_sum)?;
        Ok(loss.to_scalar::<f32>()? as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard normal by Box-Muller from the seeded RNG.
    fn normal(rng: &mut StdRng) -> f32 {
        let u1: f64 = rng.random::<f64>().max(1e-12);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn noise_rows(rng: &mut StdRng, n: usize, dim: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|_| (0..dim).map(|_| normal(rng)).collect())
            .collect()
    }

    type Split = (Vec<Vec<f32>>, Vec<usize>, Vec<Vec<f32>>, Vec<usize>);

    fn split(x: Vec<Vec<f32>>, y: Vec<usize>, seed: u64) -> Split {
        let (tr, va) = stratified_split(&y, 0.2, seed);
        (
            tr.iter().map(|&i| x[i].clone()).collect(),
            tr.iter().map(|&i| y[i]).collect(),
            va.iter().map(|&i| x[i].clone()).collect(),
            va.iter().map(|&i| y[i]).collect(),
        )
    }

    /// 4 classes, 64 dims of N(0,1); class c adds `shift` to dimension c (a linear signal in
    /// four dimensions, the other 60 are noise).
    fn planted_linear(n: usize, shift: f32, seed: u64) -> Split {
        let mut rng = StdRng::seed_from_u64(seed);
        let y: Vec<usize> = (0..n).map(|_| rng.random_range(0..4)).collect();
        let mut x = noise_rows(&mut rng, n, 64);
        for (row, &c) in x.iter_mut().zip(&y) {
            row[c] += shift;
        }
        split(x, y, seed)
    }

    /// 4 classes from two XOR bits: dims 0..4 are +-2 (random sign) plus N(0, 0.5) noise,
    /// class = 2 * (s2 xor s3) + (s0 xor s1); the other 28 dims are N(0,1) noise. No linear
    /// function of the features carries the class.
    fn planted_xor(n: usize, seed: u64) -> Split {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = noise_rows(&mut rng, n, 32);
        let mut y = Vec::with_capacity(n);
        for row in &mut x {
            let s: Vec<bool> = (0..4).map(|_| rng.random::<bool>()).collect();
            for (d, &pos) in s.iter().enumerate() {
                row[d] = if pos { 2.0 } else { -2.0 } + 0.5 * row[d];
            }
            y.push(2 * usize::from(s[2] ^ s[3]) + usize::from(s[0] ^ s[1]));
        }
        split(x, y, seed)
    }

    fn recall(pred: &[usize], gold: &[usize], class: usize) -> f64 {
        let total = gold.iter().filter(|&&g| g == class).count();
        let hit = pred
            .iter()
            .zip(gold)
            .filter(|(&p, &g)| g == class && p == class)
            .count();
        hit as f64 / total as f64
    }

    #[test]
    fn logistic_finds_planted_linear_signal() {
        let (xt, yt, xv, yv) = planted_linear(600, 3.5, 1);
        let (_, base) = majority_baseline(&yt, &yv);
        let (probe, report) = train(
            &xt,
            &yt,
            &xv,
            &yv,
            4,
            ProbeKind::Logistic,
            &TrainOptions::default(),
            &Device::Cpu,
        )
        .unwrap();
        eprintln!(
            "logistic planted: val accuracy {} macro-F1 {} (best epoch {} of {}) majority {base}",
            report.val_accuracy, report.val_macro_f1, report.best_epoch, report.epochs_run
        );
        assert!(
            report.val_accuracy >= 0.9 && report.val_accuracy >= base + 0.5,
            "val accuracy {} vs majority {base}",
            report.val_accuracy
        );
        assert!(
            report.val_macro_f1 >= 0.85,
            "macro-F1 {}",
            report.val_macro_f1
        );
        let pred = probe.predict(&xv).unwrap();
        assert_eq!(accuracy(&pred, &yv), report.val_accuracy);
        for p in probe.predict_proba(&xv).unwrap() {
            assert_eq!(p.len(), 4);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert_eq!((probe.input_dim(), probe.classes()), (64, 4));
        assert_eq!(probe.kind(), ProbeKind::Logistic);
    }

    #[test]
    fn mlp_learns_xor_signal_that_logistic_cannot() {
        let (xt, yt, xv, yv) = planted_xor(800, 2);
        let opts = TrainOptions {
            lr: 3e-3,
            patience: 20,
            ..TrainOptions::default()
        };
        let (_, lin) = train(
            &xt,
            &yt,
            &xv,
            &yv,
            4,
            ProbeKind::Logistic,
            &opts,
            &Device::Cpu,
        )
        .unwrap();
        let (_, mlp) = train(
            &xt,
            &yt,
            &xv,
            &yv,
            4,
            ProbeKind::Mlp { hidden: 64 },
            &opts,
            &Device::Cpu,
        )
        .unwrap();
        let (_, base) = majority_baseline(&yt, &yv);
        eprintln!(
            "xor: logistic {} mlp {} (epochs {}/{}) majority {base}",
            lin.val_accuracy, mlp.val_accuracy, mlp.best_epoch, mlp.epochs_run
        );
        assert!(
            mlp.val_accuracy >= 0.85 && lin.val_accuracy <= 0.45,
            "mlp {} logistic {} (majority {base})",
            mlp.val_accuracy,
            lin.val_accuracy
        );
    }

    #[test]
    fn noise_features_stay_near_majority_baseline() {
        let mut rng = StdRng::seed_from_u64(3);
        let y: Vec<usize> = (0..600).map(|_| rng.random_range(0..4)).collect();
        let x = noise_rows(&mut rng, 600, 64);
        let (xt, yt, xv, yv) = split(x, y, 3);
        let (_, base) = majority_baseline(&yt, &yv);
        for kind in [ProbeKind::Logistic, ProbeKind::Mlp { hidden: 64 }] {
            let (_, r) = train(
                &xt,
                &yt,
                &xv,
                &yv,
                4,
                kind,
                &TrainOptions::default(),
                &Device::Cpu,
            )
            .unwrap();
            eprintln!(
                "noise {kind:?}: val accuracy {} majority {base}",
                r.val_accuracy
            );
            assert!(
                r.val_accuracy <= base + 0.12,
                "{kind:?}: val accuracy {} on pure noise vs majority {base}",
                r.val_accuracy
            );
        }
    }

    #[test]
    fn training_is_deterministic_for_a_seed() {
        let (xt, yt, xv, yv) = planted_linear(300, 1.5, 4);
        let kind = ProbeKind::Mlp { hidden: 16 };
        let run = |seed| {
            let opts = TrainOptions {
                seed,
                epochs: 15,
                ..TrainOptions::default()
            };
            train(&xt, &yt, &xv, &yv, 4, kind, &opts, &Device::Cpu).unwrap()
        };
        let (a, ra) = run(7);
        let (b, rb) = run(7);
        let (c, _) = run(8);
        assert_eq!(ra, rb);
        assert_eq!(a.predict_proba(&xv).unwrap(), b.predict_proba(&xv).unwrap());
        let w = |p: &Probe| {
            p.out
                .weight
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c), "different seeds gave the same weights");
        assert_ne!(a.predict_proba(&xv).unwrap(), c.predict_proba(&xv).unwrap());
    }

    #[test]
    fn class_weights_recall_the_minority_class() {
        // 90/10 binary: the minority adds 2 to dimension 0 of 32 N(0,1) dims.
        let mut rng = StdRng::seed_from_u64(5);
        let n = 2000;
        let y: Vec<usize> = (0..n)
            .map(|_| usize::from(rng.random::<f32>() < 0.1))
            .collect();
        let mut x = noise_rows(&mut rng, n, 32);
        for (row, &c) in x.iter_mut().zip(&y) {
            row[0] += 2.0 * c as f32;
        }
        let (xt, yt, xv, yv) = split(x, y, 5);
        let weighted = TrainOptions::default();
        let (pw, rw) = train(
            &xt,
            &yt,
            &xv,
            &yv,
            2,
            ProbeKind::Logistic,
            &weighted,
            &Device::Cpu,
        )
        .unwrap();
        let unweighted = TrainOptions {
            class_weights: Some(vec![1.0, 1.0]),
            ..TrainOptions::default()
        };
        let (pu, _) = train(
            &xt,
            &yt,
            &xv,
            &yv,
            2,
            ProbeKind::Logistic,
            &unweighted,
            &Device::Cpu,
        )
        .unwrap();
        let rec_w = recall(&pw.predict(&xv).unwrap(), &yv, 1);
        let rec_u = recall(&pu.predict(&xv).unwrap(), &yv, 1);
        eprintln!(
            "minority recall: weighted {rec_w} (weights {:?}) unweighted {rec_u}",
            rw.class_weights
        );
        assert!(rw.class_weights[1] > 5.0 * rw.class_weights[0]);
        let mean = rw.class_weights.iter().sum::<f32>() / 2.0;
        assert!((mean - 1.0).abs() < 1e-6);
        assert!(
            rec_w >= 0.7 && rec_w > rec_u + 0.1,
            "minority recall weighted {rec_w} unweighted {rec_u}"
        );
    }

    #[test]
    fn save_load_round_trip_and_bad_files() {
        let (xt, yt, xv, yv) = planted_linear(200, 2.0, 6);
        let dir = tempfile::tempdir().unwrap();
        for kind in [ProbeKind::Logistic, ProbeKind::Mlp { hidden: 8 }] {
            let opts = TrainOptions {
                epochs: 5,
                ..TrainOptions::default()
            };
            let (probe, _) = train(&xt, &yt, &xv, &yv, 4, kind, &opts, &Device::Cpu).unwrap();
            let path = dir.path().join("probe.safetensors");
            probe.save(&path).unwrap();
            let back = Probe::load(&path, &Device::Cpu).unwrap();
            assert_eq!(back.kind(), kind);
            assert_eq!((back.input_dim(), back.classes()), (64, 4));
            let (p0, p1) = (
                probe.predict_proba(&xv).unwrap(),
                back.predict_proba(&xv).unwrap(),
            );
            let bits = |p: &Vec<Vec<f32>>| -> Vec<u32> {
                p.iter().flatten().map(|v| v.to_bits()).collect()
            };
            assert_eq!(bits(&p0), bits(&p1));

            // Truncated and garbage files.
            let bytes = std::fs::read(&path).unwrap();
            let bad = dir.path().join("bad.safetensors");
            std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
            assert!(Probe::load(&bad, &Device::Cpu).is_err());
            std::fs::write(&bad, b"definitely not safetensors").unwrap();
            assert!(Probe::load(&bad, &Device::Cpu).is_err());
            assert!(Probe::load(&dir.path().join("absent"), &Device::Cpu).is_err());

            // A wrong-shaped tensor, a missing one, an extra one, bad metadata.
            let good = probe.tensors().unwrap();
            type Edit = Box<dyn Fn(&mut HashMap<String, Tensor>)>;
            let edits: Vec<(&str, Edit)> = vec![
                (
                    "has shape",
                    Box::new(|m| {
                        m.insert(
                            OUT_W.into(),
                            Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
                        );
                    }),
                ),
                (
                    "missing tensor `norm.std`",
                    Box::new(|m| {
                        m.remove(STD);
                    }),
                ),
                (
                    "unexpected tensors",
                    Box::new(|m| {
                        m.insert(
                            "extra".into(),
                            Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
                        );
                    }),
                ),
                (
                    "format version",
                    Box::new(|m| {
                        m.insert(
                            META.into(),
                            Tensor::new(&[9u32, 0, 64, 4, 0], &Device::Cpu).unwrap(),
                        );
                    }),
                ),
                (
                    "has shape",
                    Box::new(|m| {
                        let meta = m[META].to_vec1::<u32>().unwrap();
                        let fake = [meta[0], meta[1], 65, meta[3], meta[4]];
                        m.insert(META.into(), Tensor::new(&fake, &Device::Cpu).unwrap());
                    }),
                ),
            ];
            for (want, edit) in edits {
                let mut m = good.clone();
                edit(&mut m);
                candle_core::safetensors::save(&m, &bad).unwrap();
                let err = format!("{:#}", Probe::load(&bad, &Device::Cpu).unwrap_err());
                assert!(err.contains(want), "{kind:?}: `{err}` lacks `{want}`");
            }
        }
    }

    #[test]
    fn early_stopping_keeps_best_epoch_weights() {
        // Few examples, many noise dims, high lr: validation loss turns up quickly.
        let (xt, yt, xv, yv) = planted_linear(160, 1.0, 7);
        let opts = TrainOptions {
            lr: 1e-2,
            weight_decay: 0.0,
            epochs: 300,
            patience: 5,
            ..TrainOptions::default()
        };
        let kind = ProbeKind::Mlp { hidden: 64 };
        let (probe, r) = train(&xt, &yt, &xv, &yv, 4, kind, &opts, &Device::Cpu).unwrap();
        eprintln!(
            "early stop: best {} of {} val loss {} last {:?}",
            r.best_epoch,
            r.epochs_run,
            r.val_loss,
            r.val_loss_history.last()
        );
        assert!(r.epochs_run < 300, "patience never triggered");
        assert!(r.best_epoch < r.epochs_run);
        assert_eq!(r.best_epoch + opts.patience, r.epochs_run);
        assert_eq!(r.val_loss, r.val_loss_history[r.best_epoch - 1]);
        let min = r
            .val_loss_history
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min);
        assert_eq!(r.val_loss, min);
        let recomputed = probe
            .weighted_cross_entropy(&xv, &yv, &r.class_weights)
            .unwrap();
        let last = *r.val_loss_history.last().unwrap();
        assert!(
            (recomputed - r.val_loss).abs() <= 1e-6 * r.val_loss,
            "returned weights give val loss {recomputed}, best was {}",
            r.val_loss
        );
        assert!(
            (last - r.val_loss).abs() > 1e-4,
            "last epoch's loss {last} too close to best {} to tell them apart",
            r.val_loss
        );
    }

    #[test]
    fn weighted_loss_gradient_reaches_logits() {
        // d loss / d logits = w_i (softmax_i - onehot_i) / sum w.
        let logits = [[1.0f32, -0.5, 0.3], [0.2, 0.1, -1.0]];
        let labels = [2usize, 0];
        let w = [0.5f32, 2.0, 3.0]; // per class
        let var = Var::new(&logits, &Device::Cpu).unwrap();
        let t = Targets::new(&labels, &w, &Device::Cpu).unwrap();
        let loss = weighted_ce(var.as_tensor(), &t.labels, &t.weights, t.weight_sum).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .expect("no gradient: graph cut")
            .to_vec2::<f32>()
            .unwrap();
        let sum_w: f32 = labels.iter().map(|&c| w[c]).sum();
        let mut expected_loss = 0.0;
        for (i, row) in logits.iter().enumerate() {
            let z: f32 = row.iter().map(|v| v.exp()).sum();
            expected_loss -= w[labels[i]] * (row[labels[i]].exp() / z).ln() / sum_w;
            for (j, &v) in row.iter().enumerate() {
                let onehot = if j == labels[i] { 1.0 } else { 0.0 };
                let want = w[labels[i]] * (v.exp() / z - onehot) / sum_w;
                assert!(
                    (g[i][j] - want).abs() < 1e-6,
                    "grad[{i}][{j}] {} vs {want}",
                    g[i][j]
                );
            }
        }
        let got = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got - expected_loss).abs() < 1e-6,
            "{got} vs {expected_loss}"
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let x = vec![vec![0.0f32, 1.0], vec![1.0, 0.0]];
        let y = vec![0usize, 1];
        let o = TrainOptions::default();
        let cpu = &Device::Cpu;
        let lg = ProbeKind::Logistic;
        assert!(train(&x, &y, &x, &y, 2, lg, &o, cpu).is_ok());
        assert!(train(&x, &y, &[], &[], 2, lg, &o, cpu).is_err());
        assert!(train(&x, &[0, 2], &x, &y, 2, lg, &o, cpu).is_err());
        assert!(train(&[vec![0.0], vec![1.0, 2.0]], &y, &x, &y, 2, lg, &o, cpu).is_err());
        assert!(train(
            &[vec![f32::NAN, 0.0], vec![1.0, 2.0]],
            &y,
            &x,
            &y,
            2,
            lg,
            &o,
            cpu
        )
        .is_err());
        let bad_w = TrainOptions {
            class_weights: Some(vec![1.0]),
            ..TrainOptions::default()
        };
        assert!(train(&x, &y, &x, &y, 2, lg, &bad_w, cpu).is_err());
        let (p, _) = train(&x, &y, &x, &y, 2, lg, &o, cpu).unwrap();
        assert!(p.predict_proba(&[vec![1.0, 2.0, 3.0]]).is_err());
        assert!(p.predict(&[]).unwrap().is_empty());
    }

    #[test]
    fn probe_kind_and_options_serde() {
        let mlp: ProbeKind = serde_json::from_str(r#"{"kind": "mlp", "hidden": 64}"#).unwrap();
        assert_eq!(mlp, ProbeKind::Mlp { hidden: 64 });
        assert_eq!(
            serde_json::to_string(&ProbeKind::Logistic).unwrap(),
            r#"{"kind":"logistic"}"#
        );
        let o: TrainOptions = serde_json::from_str(r#"{"lr": 0.01}"#).unwrap();
        assert_eq!(o.lr, 0.01);
        assert_eq!(o.batch_size, 32);
    }

    #[test]
    fn metrics_on_hand_computed_cases() {
        let gold = [0, 0, 1, 1, 2, 2];
        let pred = [0, 1, 1, 1, 2, 0];
        assert!((accuracy(&pred, &gold) - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(accuracy(&[], &[]), 0.0);
        // class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: tp 1 fp 0
        // fn 1 -> 2/3; class 3 absent from both -> left out.
        let want = (0.5 + 0.8 + 2.0 / 3.0) / 3.0;
        assert!((macro_f1(&pred, &gold, 4) - want).abs() < 1e-12);
        // A class predicted but never gold counts (F1 0).
        let f = macro_f1(&[0, 3], &[0, 0], 4);
        assert!((f - (2.0 / 3.0 + 0.0) / 2.0).abs() < 1e-12, "{f}");
        assert_eq!(macro_f1(&[1, 1], &[1, 1], 4), 1.0);
        assert_eq!(confusion_matrix(&pred, &gold, 3)[2], vec![1, 0, 1]);

        assert_eq!(
            majority_baseline(&[2, 1, 2, 1, 3], &[2, 2, 1, 0]),
            (1, 0.25)
        );
        assert_eq!(majority_baseline(&[2, 2, 1], &[2, 2, 1, 0]), (2, 0.5));
        assert_eq!(majority_baseline(&[], &[0, 1]), (0, 0.5));
    }

    #[test]
    fn stratified_split_is_proportional_and_seeded() {
        // class 0: 10, class 1: 5, class 2: 2, class 3: 1.
        let mut labels = vec![0; 10];
        labels.extend([1; 5]);
        labels.extend([2; 2]);
        labels.push(3);
        let (tr, va) = stratified_split(&labels, 0.2, 1);
        let count = |idx: &[usize], c| idx.iter().filter(|&&i| labels[i] == c).count();
        // round(2.0) = 2, round(1.0) = 1, round(0.4) = 0 -> clamped to 1, single -> train.
        assert_eq!([0, 1, 2, 3].map(|c| count(&va, c)), [2, 1, 1, 0]);
        assert_eq!([0, 1, 2, 3].map(|c| count(&tr, c)), [8, 4, 1, 1]);
        let mut all: Vec<usize> = tr.iter().chain(&va).cloned().collect();
        all.sort_unstable();
        assert_eq!(all, (0..labels.len()).collect::<Vec<_>>(), "a partition");
        assert!(tr.windows(2).all(|w| w[0] < w[1]) && va.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(stratified_split(&labels, 0.2, 1), (tr.clone(), va.clone()));
        let other: Vec<_> = (2..20)
            .map(|s| stratified_split(&labels, 0.2, s).1)
            .collect();
        assert!(other.iter().any(|v| *v != va), "seed changes nothing");
        // Fraction 1 still leaves one training example per class of >= 2; 0 leaves none.
        let (tr1, va1) = stratified_split(&labels, 1.0, 1);
        assert_eq!([0, 1, 2, 3].map(|c| count(&tr1, c)), [1, 1, 1, 1]);
        assert_eq!(va1.len(), labels.len() - 4);
        assert!(stratified_split(&labels, 0.0, 1).1.is_empty());
    }
}
