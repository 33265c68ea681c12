//! The layer-wise analysis behind `ttarag gate train`: one probe per layer x position x probe
//! kind, trained on one split, early-stopped and chosen on a second (validation), and scored on
//! a third (held out) that plays no part in any choice.

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use serde::Serialize;

use crate::gate::card::Pass;
use crate::gate::features::{feature_row, LayerFeatures, Position};
use crate::gate::policy::{decide, Policy, CLASSES, S2, S3};
use crate::gate::probe::{
    accuracy, macro_f1, majority_baseline, stratified_split, train, Probe, ProbeKind, TrainOptions,
};

/// What to try and how to split.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Layers to probe; empty = every layer (0 = embeddings .. L).
    pub layers: Vec<usize>,
    /// `post` needs the features of the prompts with passages.
    pub passes: Vec<Pass>,
    pub positions: Vec<Position>,
    pub kinds: Vec<ProbeKind>,
    /// Fraction of all rows held out for the final scores.
    pub test_fraction: f64,
    /// Fraction of all rows used for early stopping and the choice.
    pub val_fraction: f64,
    pub train: TrainOptions,
}

impl Default for SweepOptions {
    fn default() -> Self {
        Self {
            layers: vec![],
            passes: vec![Pass::Pre],
            positions: vec![Position::Last, Position::Mean],
            kinds: vec![ProbeKind::Logistic, ProbeKind::Mlp { hidden: 64 }],
            test_fraction: 0.2,
            val_fraction: 0.2,
            train: TrainOptions::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    pub accuracy: f64,
    pub macro_f1: f64,
}

/// One probe of the sweep.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cell {
    pub layer: usize,
    pub pass: Pass,
    pub position: Position,
    pub probe: ProbeKind,
    pub val: Scores,
    pub test: Scores,
    pub best_epoch: usize,
}

/// What a policy would have done on the held-out rows, read off their classes: a row's answer
/// is right with retrieval for S2/S4 and without for S3/S4.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyOutcome {
    pub policy: Policy,
    /// Fraction of held-out questions the gate would answer without retrieval.
    pub skipped: f64,
    /// Accuracy when the gate decides.
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    pub cells: Vec<Cell>,
    /// Index into `cells` of the chosen probe: best validation macro-F1, then accuracy, then
    /// the earlier cell.
    pub best: usize,
    /// Majority class of the training split and its accuracy on validation and held-out rows.
    pub majority_class: usize,
    pub majority_val_accuracy: f64,
    pub majority_test_accuracy: f64,
    pub n_train: usize,
    pub n_val: usize,
    pub n_test: usize,
    /// Rows per class, all splits.
    pub label_counts: [usize; 4],
    /// Held-out accuracy with retrieval always and never, for comparison with `policies`.
    pub always_accuracy: f64,
    pub never_accuracy: f64,
    /// The chosen probe under each policy, on the held-out rows.
    pub policies: Vec<PolicyOutcome>,
}

/// The features of every question: `pre` always, `post` (prompt with passages) when the post
/// pass is swept.
#[derive(Clone, Copy)]
pub struct FeatureSets<'a> {
    pub pre: &'a [LayerFeatures],
    pub post: Option<&'a [LayerFeatures]>,
}

impl FeatureSets<'_> {
    fn rows(&self, idx: &[usize], pass: Pass, layer: usize, pos: Position) -> Vec<Vec<f32>> {
        idx.iter()
            .map(|&i| {
                let post = self.post.map(|p| &p[i]);
                feature_row(&self.pre[i], post, pass, layer, pos)
                    .expect("layers and passes checked against every row")
            })
            .collect()
    }
}

/// Runs the sweep over `feats` (one per question) labelled `labels` (class indices), returning
/// the report and the chosen probe.
pub fn sweep(
    feats: FeatureSets,
    labels: &[usize],
    opts: &SweepOptions,
    device: &Device,
) -> Result<(Sweep, Probe)> {
    ensure!(
        feats.pre.len() == labels.len(),
        "{} feature rows but {} labels",
        feats.pre.len(),
        labels.len()
    );
    ensure!(
        !opts.positions.is_empty() && !opts.kinds.is_empty() && !opts.passes.is_empty(),
        "nothing to sweep"
    );
    let mut depth = feats
        .pre
        .iter()
        .map(LayerFeatures::layers)
        .min()
        .unwrap_or(0);
    if opts.passes.contains(&Pass::Post) {
        let post = feats
            .post
            .filter(|p| p.len() == labels.len())
            .context("the post pass needs features with passages for every question")?;
        depth = depth.min(post.iter().map(LayerFeatures::layers).min().unwrap_or(0));
    }
    ensure!(depth > 0, "no features");
    let layers: Vec<usize> = if opts.layers.is_empty() {
        (0..depth).collect()
    } else {
        opts.layers.clone()
    };
    if let Some(l) = layers.iter().find(|&&l| l >= depth) {
        anyhow::bail!(
            "layer {l} does not exist: the features have layers 0..={}",
            depth - 1
        );
    }
    let mut label_counts = [0usize; 4];
    for &c in labels {
        ensure!(c < CLASSES.len(), "label {c} is not a class index");
        label_counts[c] += 1;
    }
    ensure!(
        label_counts.iter().filter(|&&n| n > 0).count() >= 2,
        "every question has the same class ({label_counts:?}): nothing to learn"
    );

    let (rest, test) = stratified_split(labels, opts.test_fraction, opts.train.seed);
    let rest_labels: Vec<usize> = rest.iter().map(|&i| labels[i]).collect();
    let val_share = opts.val_fraction / (1.0 - opts.test_fraction).max(f64::EPSILON);
    let (tr, va) = stratified_split(&rest_labels, val_share.min(1.0), opts.train.seed + 1);
    let train_idx: Vec<usize> = tr.iter().map(|&j| rest[j]).collect();
    let val_idx: Vec<usize> = va.iter().map(|&j| rest[j]).collect();
    ensure!(
        !train_idx.is_empty() && !val_idx.is_empty() && !test.is_empty(),
        "{} questions are too few for train/validation/held-out splits",
        labels.len()
    );
    let pick = |idx: &[usize]| idx.iter().map(|&i| labels[i]).collect::<Vec<_>>();
    let (y_train, y_val, y_test) = (pick(&train_idx), pick(&val_idx), pick(&test));
    let (majority_class, majority_val_accuracy) = majority_baseline(&y_train, &y_val);
    let (_, majority_test_accuracy) = majority_baseline(&y_train, &y_test);

    let k = CLASSES.len();
    let mut cells = Vec::new();
    let mut best: Option<(usize, Probe)> = None;
    for &layer in &layers {
        for &pass in &opts.passes {
            for &position in &opts.positions {
                let x_train = feats.rows(&train_idx, pass, layer, position);
                let x_val = feats.rows(&val_idx, pass, layer, position);
                let x_test = feats.rows(&test, pass, layer, position);
                for &kind in &opts.kinds {
                    let (probe, rep) = train(
                        &x_train,
                        &y_train,
                        &x_val,
                        &y_val,
                        k,
                        kind,
                        &opts.train,
                        device,
                    )?;
                    let pv = probe.predict(&x_val)?;
                    let pt = probe.predict(&x_test)?;
                    let cell = Cell {
                        layer,
                        pass,
                        position,
                        probe: kind,
                        val: Scores {
                            accuracy: accuracy(&pv, &y_val),
                            macro_f1: macro_f1(&pv, &y_val, k),
                        },
                        test: Scores {
                            accuracy: accuracy(&pt, &y_test),
                            macro_f1: macro_f1(&pt, &y_test, k),
                        },
                        best_epoch: rep.best_epoch,
                    };
                    let better = match &best {
                        None => true,
                        Some((b, _)) => {
                            let b = &cells[*b];
                            let key = |c: &Cell| (c.val.macro_f1, c.val.accuracy);
                            key(&cell) > key(b)
                        }
                    };
                    cells.push(cell);
                    if better {
                        best = Some((cells.len() - 1, probe));
                    }
                }
            }
        }
    }
    let (best, probe) = best.expect("at least one cell");
    let chosen = &cells[best];
    let x_test = feats.rows(&test, chosen.pass, chosen.layer, chosen.position);
    let probs = probe.predict_proba(&x_test)?;
    let right_with = |c: usize| c == S2 || c == 3;
    let right_without = |c: usize| c == S3 || c == 3;
    let mean = |v: &mut dyn Iterator<Item = bool>| {
        let (n, r) = v.fold((0usize, 0usize), |(n, r), b| (n + 1, r + b as usize));
        r as f64 / n.max(1) as f64
    };
    let policies = [
        Policy::Always,
        Policy::Optimistic,
        Policy::Pessimistic,
        Policy::Threshold(0.25),
        Policy::Threshold(0.5),
    ]
    .into_iter()
    .map(|policy| {
        let decisions: Vec<bool> = probs
            .iter()
            .map(|p| decide(policy, &[p[0], p[1], p[2], p[3]]).retrieves())
            .collect();
        PolicyOutcome {
            policy,
            skipped: mean(&mut decisions.iter().map(|d| !d)),
            accuracy: mean(&mut decisions.iter().zip(&y_test).map(|(&d, &c)| {
                if d {
                    right_with(c)
                } else {
                    right_without(c)
                }
            })),
        }
    })
    .collect();
    let sweep = Sweep {
        always_accuracy: mean(&mut y_test.iter().map(|&c| right_with(c))),
        never_accuracy: mean(&mut y_test.iter().map(|&c| right_without(c))),
        policies,
        cells,
        best,
        majority_class,
        majority_val_accuracy,
        majority_test_accuracy,
        n_train: train_idx.len(),
        n_val: val_idx.len(),
        n_test: test.len(),
        label_counts,
    };
    Ok((sweep, probe))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Noise everywhere; at `signal_layer`'s last position, dimension 0 carries the class.
    fn planted(
        n: usize,
        layers: usize,
        dim: usize,
        signal_layer: usize,
    ) -> (Vec<LayerFeatures>, Vec<usize>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut feats = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let class = [0, 1, 1, 2][i % 4];
            let mut noise = || {
                (0..dim)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            };
            let mut last: Vec<Vec<f32>> = (0..layers).map(|_| noise()).collect();
            let mean: Vec<Vec<f32>> = (0..layers).map(|_| noise()).collect();
            last[signal_layer][0] = class as f32 * 3.0;
            feats.push(LayerFeatures {
                last,
                mean,
                question_span: (0, 1),
            });
            labels.push(class);
        }
        (feats, labels)
    }

    /// Quick training for planted signals.
    fn quick() -> TrainOptions {
        TrainOptions {
            lr: 5e-2,
            epochs: 60,
            ..Default::default()
        }
    }

    fn pre(feats: &[LayerFeatures]) -> FeatureSets<'_> {
        FeatureSets {
            pre: feats,
            post: None,
        }
    }

    #[test]
    fn the_post_pass_finds_a_signal_only_the_passages_carry() {
        let (post, labels) = planted(240, 3, 6, 1);
        let (pre_feats, _) = planted(240, 3, 6, 0);
        // The pre features carry no class: shuffle their labels' signal away.
        let pre_noise: Vec<LayerFeatures> = pre_feats
            .iter()
            .map(|f| {
                let mut f = f.clone();
                f.last[0][0] = 0.0;
                f
            })
            .collect();
        let opts = SweepOptions {
            passes: vec![Pass::Pre, Pass::Post],
            positions: vec![Position::Last],
            kinds: vec![ProbeKind::Logistic],
            train: quick(),
            ..Default::default()
        };
        let sets = FeatureSets {
            pre: &pre_noise,
            post: Some(&post),
        };
        let (s, probe) = sweep(sets, &labels, &opts, &Device::Cpu).unwrap();
        assert_eq!(s.cells.len(), 3 * 2);
        let best = &s.cells[s.best];
        assert_eq!((best.layer, best.pass), (1, Pass::Post), "{best:?}");
        assert!(best.test.accuracy > 0.95, "{best:?}");
        assert_eq!(probe.input_dim(), 12);
        let pre_best = s
            .cells
            .iter()
            .filter(|c| c.pass == Pass::Pre)
            .map(|c| c.test.accuracy)
            .fold(0.0, f64::max);
        assert!(pre_best < 0.75, "{pre_best}");
        // Without the post features the post pass is refused, not silently skipped.
        assert!(sweep(pre(&pre_noise), &labels, &opts, &Device::Cpu).is_err());
    }

    #[test]
    fn finds_the_layer_and_position_that_carry_the_signal() {
        let (feats, labels) = planted(240, 4, 6, 2);
        let opts = SweepOptions {
            kinds: vec![ProbeKind::Logistic],
            train: quick(),
            ..Default::default()
        };
        let (s, probe) = sweep(pre(&feats), &labels, &opts, &Device::Cpu).unwrap();
        assert_eq!(s.cells.len(), 4 * 2);
        let best = &s.cells[s.best];
        assert_eq!((best.layer, best.position), (2, Position::Last));
        assert!(best.test.accuracy > 0.95, "{best:?}");
        assert!(s.majority_test_accuracy < 0.6);
        let noise = s
            .cells
            .iter()
            .filter(|c| c.layer != 2 || c.position != Position::Last)
            .map(|c| c.test.accuracy)
            .fold(0.0, f64::max);
        assert!(noise < 0.75, "no other cell should see the class: {noise}");
        assert_eq!(s.n_train + s.n_val + s.n_test, 240);
        assert_eq!(s.label_counts, [60, 120, 60, 0]);
        assert_eq!(probe.input_dim(), 6);

        // Classes 0/1/2 = S1/S2/S3: retrieval is right only for S2, abstaining only for S3.
        let always = &s.policies[0];
        assert_eq!(always.skipped, 0.0);
        assert!((always.accuracy - s.always_accuracy).abs() < 1e-12);
        let optimistic = &s.policies[1];
        assert!((optimistic.skipped - 0.25).abs() < 0.06, "{optimistic:?}");
        assert!(
            optimistic.accuracy > s.always_accuracy + 0.2,
            "{optimistic:?}"
        );
    }

    #[test]
    fn refuses_what_it_cannot_learn() {
        let (feats, labels) = planted(40, 3, 4, 1);
        let opts = SweepOptions::default();
        let one = vec![1; 40];
        assert!(sweep(pre(&feats), &one, &opts, &Device::Cpu).is_err());
        let far = SweepOptions {
            layers: vec![3],
            ..Default::default()
        };
        let e = sweep(pre(&feats), &labels, &far, &Device::Cpu).unwrap_err();
        assert!(e.to_string().contains("layer 3"), "{e}");
        assert!(sweep(pre(&feats[..3]), &labels[..3], &opts, &Device::Cpu).is_err());
    }
}
