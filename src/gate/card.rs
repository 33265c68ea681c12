//! The gate artefact: a JSON card that says what a probe was fitted to (model, layer, position,
//! classes, data, scores) beside the probe's safetensors weights. The server refuses a card
//! made for other weights, since hidden states of another model mean nothing to the probe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

// `Pass` is the features' own notion; the card names it.
pub use super::features::Pass;
use super::features::Position;
use super::policy::CLASSES;
use super::probe::{Probe, ProbeKind};
use crate::model::fingerprint::WeightsDigest;
use crate::model::Model;

/// Version of the card layout.
pub const CARD_FORMAT: u32 = 1;

/// What a probe's classes are about, and so what its decision switches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decides {
    /// Classes compare answers without and with retrieval: the gate decides whether to
    /// retrieve (and adapt, when `then` is `tta`).
    #[default]
    Retrieval,
    /// Classes compare answers with retrieval but without and with adaptation (S2 = right
    /// only when adapted, S3 = right only when not): the gate decides whether to adapt.
    Adaptation,
}

impl Decides {
    pub fn name(self) -> &'static str {
        match self {
            Decides::Retrieval => "retrieval",
            Decides::Adaptation => "adaptation",
        }
    }
}

/// The model a probe reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardModel {
    pub id: String,
    /// [`crate::model::fingerprint::weights_sha256`] of the weights the features came from.
    pub sha256: String,
    pub hidden_size: usize,
    pub num_layers: usize,
}

/// Where the features are read: `layer` 0 is the embedding output, `l` block `l`'s output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureTap {
    pub pass: Pass,
    pub layer: usize,
    pub position: Position,
}

/// Held-out scores of the chosen probe, beside the majority-class baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardScores {
    pub n: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub majority_class: String,
    pub majority_accuracy: f64,
}

/// Everything about a probe except its weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateCard {
    pub format: u32,
    /// Cards written before adaptation gates existed decide retrieval.
    #[serde(default)]
    pub decides: Decides,
    pub model: CardModel,
    pub features: FeatureTap,
    pub probe: ProbeKind,
    /// The weights file, relative to the card's folder.
    pub weights: String,
    /// Class names in the probe's output order.
    pub classes: Vec<String>,
    /// Training rows per class (training and validation splits together).
    pub label_counts: BTreeMap<String, usize>,
    pub validation: CardScores,
    /// Scores on rows that played no part in training or the choice.
    #[serde(default)]
    pub held_out: Option<CardScores>,
    /// How the probe was made (record files, arms, options, seed): free-form, for people.
    #[serde(default)]
    pub training: serde_json::Value,
}

impl GateCard {
    /// The weights path for a card stored at `card_path`.
    pub fn weights_path(&self, card_path: &Path) -> PathBuf {
        card_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&self.weights)
    }

    /// Writes the card as pretty JSON and the probe beside it (under `self.weights`).
    pub fn save(&self, card_path: &Path, probe: &Probe) -> Result<()> {
        if let Some(dir) = card_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        probe.save(&self.weights_path(card_path))?;
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(card_path, json + "\n")
            .with_context(|| format!("cannot write gate card {}", card_path.display()))
    }

    pub fn read(card_path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(card_path)
            .with_context(|| format!("cannot read gate card {}", card_path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("gate card {}: not a valid card", card_path.display()))
    }
}

/// A probe ready to run on one model: its card checked against that model.
#[derive(Debug, Clone)]
pub struct LoadedGate {
    pub card: GateCard,
    pub probe: Probe,
}

/// The card (and its probe's input width) against the model's hidden size and depth.
fn check_shape(card: &GateCard, model: &Model, probe_input: usize) -> Result<()> {
    let cfg = model.decoder.config();
    let width = card.features.pass.width();
    ensure!(
        card.model.hidden_size == cfg.hidden_size && probe_input == cfg.hidden_size * width,
        "made for `{}` with hidden size {} (probe input {}, {} pass), but the model's is {}; \
         train a probe for this model with `ttarag gate train`",
        card.model.id,
        card.model.hidden_size,
        probe_input,
        card.features.pass.name(),
        cfg.hidden_size
    );
    ensure!(
        card.model.num_layers == cfg.num_hidden_layers
            && card.features.layer <= cfg.num_hidden_layers,
        "reads layer {} of {} layers, but the model has {}",
        card.features.layer,
        card.model.num_layers,
        cfg.num_hidden_layers
    );
    Ok(())
}

/// Refuses a card whose classes are about something else than `want` (an adaptation probe in
/// the retrieval gate's place, or the reverse).
fn check_kind(card: &GateCard, want: Decides) -> Result<()> {
    ensure!(
        card.decides == want,
        "the card's probe decides {}, but it is configured as the {} gate",
        card.decides.name(),
        want.name()
    );
    Ok(())
}

impl LoadedGate {
    /// Reads the card at `card_path` and its probe, refusing a card made for other weights
    /// (`model_sha256` is the serving model's fingerprint), another hidden size or depth, or
    /// whose probe does not match the card.
    pub fn load(
        card_path: &Path,
        model: &Model,
        model_sha256: &str,
        device: &Device,
    ) -> Result<Self> {
        let card = GateCard::read(card_path)?;
        let probe = Probe::load(&card.weights_path(card_path), device)?;
        Self::new(card, probe, model, model_sha256)
            .with_context(|| format!("gate card {}", card_path.display()))
    }

    /// The card at `card_path` as the gate that decides `want`, for `model` whose weights'
    /// digest is `weights`. The card's kind and shape are checked before the digest is asked
    /// for: hashing a large model only to learn that the probe cannot fit it would cost
    /// seconds.
    pub fn open(
        card_path: &Path,
        want: Decides,
        model: &Model,
        weights: &WeightsDigest,
    ) -> Result<Self> {
        let card = GateCard::read(card_path)?;
        check_kind(&card, want)
            .and_then(|()| {
                check_shape(
                    &card,
                    model,
                    card.model.hidden_size * card.features.pass.width(),
                )
            })
            .with_context(|| format!("gate card {}", card_path.display()))?;
        Self::load(card_path, model, weights.sha256()?, model.decoder.device())
    }

    /// Refuses a loaded gate that decides something else than `want`.
    pub fn expect(self, want: Decides) -> Result<Self> {
        check_kind(&self.card, want)?;
        Ok(self)
    }

    /// Checks `card` and `probe` against `model` (see [`LoadedGate::load`]).
    pub fn new(card: GateCard, probe: Probe, model: &Model, model_sha256: &str) -> Result<Self> {
        ensure!(
            card.format == CARD_FORMAT,
            "card format {} is not {CARD_FORMAT}",
            card.format
        );
        ensure!(
            card.model.sha256 == model_sha256,
            "made for model `{}` with weights sha256 {}, but the served weights hash to {}; \
             train a probe for this model with `ttarag gate train`",
            card.model.id,
            card.model.sha256,
            model_sha256
        );
        check_shape(&card, model, probe.input_dim())?;
        ensure!(
            card.classes == CLASSES && probe.classes() == CLASSES.len(),
            "classes {:?} (probe outputs {}), expected {CLASSES:?}",
            card.classes,
            probe.classes()
        );
        ensure!(
            card.probe == probe.kind(),
            "card says {:?} but the weights are {:?}",
            card.probe,
            probe.kind()
        );
        Ok(Self { card, probe })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::probe::{train, TrainOptions};
    use crate::model::tiny::tiny_model;

    fn fitted(dim: usize, kind: ProbeKind) -> Probe {
        let x: Vec<Vec<f32>> = (0..16)
            .map(|i| (0..dim).map(|d| ((i * 7 + d * 3) % 11) as f32).collect())
            .collect();
        let y: Vec<usize> = (0..16).map(|i| i % 4).collect();
        let opts = TrainOptions {
            epochs: 2,
            ..Default::default()
        };
        train(&x, &y, &x, &y, 4, kind, &opts, &Device::Cpu)
            .unwrap()
            .0
    }

    fn card_for(model: &Model, layer: usize, kind: ProbeKind) -> GateCard {
        let cfg = model.decoder.config();
        GateCard {
            format: CARD_FORMAT,
            decides: Decides::Retrieval,
            model: CardModel {
                id: model.id.clone(),
                sha256: "abc".into(),
                hidden_size: cfg.hidden_size,
                num_layers: cfg.num_hidden_layers,
            },
            features: FeatureTap {
                pass: Pass::Pre,
                layer,
                position: Position::Mean,
            },
            probe: kind,
            weights: "gate.safetensors".into(),
            classes: CLASSES.iter().map(|c| c.to_string()).collect(),
            label_counts: BTreeMap::from([("S1".to_string(), 8), ("S2".to_string(), 8)]),
            validation: CardScores {
                n: 4,
                accuracy: 0.5,
                macro_f1: 0.4,
                majority_class: "S1".into(),
                majority_accuracy: 0.25,
            },
            held_out: None,
            training: serde_json::json!({"records": ["x.jsonl"]}),
        }
    }

    #[test]
    fn round_trip_gives_the_same_card_and_probabilities() {
        let model = tiny_model(1).unwrap();
        let dim = model.decoder.config().hidden_size;
        let kind = ProbeKind::Mlp { hidden: 8 };
        let probe = fitted(dim, kind);
        let card = card_for(&model, 1, kind);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/gate.json");
        card.save(&path, &probe).unwrap();
        let g = LoadedGate::load(&path, &model, "abc", &Device::Cpu).unwrap();
        assert_eq!(g.card, card);
        let row = vec![(0..dim).map(|d| d as f32 / 10.0).collect::<Vec<f32>>()];
        assert_eq!(
            g.probe.predict_proba(&row).unwrap(),
            probe.predict_proba(&row).unwrap()
        );
    }

    #[test]
    fn a_card_for_other_weights_or_shapes_is_refused() {
        let model = tiny_model(1).unwrap();
        let cfg = model.decoder.config().clone();
        let dim = cfg.hidden_size;
        let kind = ProbeKind::Logistic;
        let ok = |card: GateCard, probe: Probe, sha: &str| {
            LoadedGate::new(card, probe, &model, sha).map(|_| ())
        };
        assert!(ok(card_for(&model, 1, kind), fitted(dim, kind), "abc").is_ok());

        let e = ok(card_for(&model, 1, kind), fitted(dim, kind), "def").unwrap_err();
        assert!(e.to_string().contains("sha256"), "{e}");

        let e = ok(card_for(&model, 1, kind), fitted(dim + 1, kind), "abc").unwrap_err();
        assert!(e.to_string().contains("hidden size"), "{e}");
        let mut wide = card_for(&model, 1, kind);
        wide.model.hidden_size = dim * 2;
        assert!(ok(wide, fitted(dim, kind), "abc").is_err());

        let deep = card_for(&model, cfg.num_hidden_layers + 1, kind);
        let e = ok(deep, fitted(dim, kind), "abc").unwrap_err();
        assert!(e.to_string().contains("layer"), "{e}");

        let mlp = card_for(&model, 1, ProbeKind::Mlp { hidden: 8 });
        assert!(ok(mlp, fitted(dim, kind), "abc").is_err());

        // A post-pass probe reads the two passes side by side: twice the hidden size.
        let mut post = card_for(&model, 1, kind);
        post.features.pass = Pass::Post;
        let e = ok(post.clone(), fitted(dim, kind), "abc").unwrap_err();
        assert!(e.to_string().contains("post pass"), "{e}");
        assert!(ok(post, fitted(2 * dim, kind), "abc").is_ok());

        let mut three = card_for(&model, 1, kind);
        three.classes.pop();
        assert!(ok(three, fitted(dim, kind), "abc").is_err());
    }

    #[test]
    fn a_malformed_card_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.json");
        std::fs::write(&path, "{\"format\": 1}").unwrap();
        let e = GateCard::read(&path).unwrap_err();
        assert!(format!("{e:#}").contains("not a valid card"), "{e:#}");
        let e = GateCard::read(&dir.path().join("missing.json")).unwrap_err();
        assert!(format!("{e:#}").contains("cannot read"), "{e:#}");
    }
}
