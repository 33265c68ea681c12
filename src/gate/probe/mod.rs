//! The gate's classifier: a logistic regression or a one-hidden-layer MLP over standardised
//! hidden-state features, trained with class-weighted cross-entropy in seconds on a CPU.
//!
//! Features are rows of `f32` (`&[Vec<f32>]`, one row per question, all of the same length):
//! they come from the decoder's hidden states on the host and are few (hundreds to thousands of
//! rows), so the probe copies them to its device itself. The probe always computes in f32,
//! whatever dtype the model that produced the features uses.
//!
//! Training (`train.rs`, in the lab build): per-dimension standardisation fitted on the training split,
//! seeded initialisation and shuffling (same seed, same probe), AdamW (weight decay on weight
//! matrices, not biases), early stopping on the class-weighted validation loss keeping a copy of
//! the best epoch's weights. The result saves to and loads from a safetensors file.

#[cfg(feature = "lab")]
mod metrics;
#[cfg(feature = "lab")]
mod train;

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::policy::argmax;
#[cfg(feature = "lab")]
pub use metrics::{accuracy, confusion_matrix, macro_f1, majority_baseline, stratified_split};
#[cfg(feature = "lab")]
pub use train::{train, TrainOptions, TrainReport};

/// The classifier's shape. Serialised as `{"kind": "logistic"}` or
/// `{"kind": "mlp", "hidden": 64}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProbeKind {
    /// Multinomial logistic regression: one linear layer to the class logits.
    Logistic,
    /// Linear -> ReLU -> dropout (training only) -> linear.
    Mlp {
        /// Width of the hidden layer.
        hidden: usize,
    },
}

/// A linear layer's parameters: weight `(out, in)`, bias `(out)`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

/// A trained gate classifier (see the module docs). Cheap to clone (tensors are shared).
#[derive(Debug, Clone)]
pub struct Probe {
    kind: ProbeKind,
    input_dim: usize,
    classes: usize,
    /// Per-dimension training mean, `(input_dim)`.
    mean: Tensor,
    /// Per-dimension training standard deviation (floored at [`STD_FLOOR`]), `(input_dim)`.
    std: Tensor,
    /// The MLP's hidden layer; `None` for a logistic probe.
    hidden: Option<Linear>,
    out: Linear,
}

/// Lower bound on a feature's standard deviation, so constant features do not divide by zero.
pub const STD_FLOOR: f32 = 1e-6;

/// Version of the safetensors layout written by [`Probe::save`].
const FORMAT_VERSION: u32 = 1;
const META: &str = "gate.meta";
const MEAN: &str = "norm.mean";
const STD: &str = "norm.std";
const HIDDEN_W: &str = "hidden.weight";
const HIDDEN_B: &str = "hidden.bias";
const OUT_W: &str = "out.weight";
const OUT_B: &str = "out.bias";

/// Logits of standardised features `x` `(n, in)`; `mask` (`(n, hidden)`, already scaled by
/// `1 / (1 - p)`) is the dropout applied after the hidden ReLU.
fn forward(
    x: &Tensor,
    hidden: Option<(&Tensor, &Tensor)>,
    out: (&Tensor, &Tensor),
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    if let Some((w, b)) = hidden {
        h = h.matmul(&w.t()?)?.broadcast_add(b)?.relu()?;
        if let Some(m) = mask {
            h = h.mul(m)?;
        }
    }
    h.matmul(&out.0.t()?)?.broadcast_add(out.1)
}

/// Rows as one row-major buffer, checking that each has `dim` finite values.
fn flatten(x: &[Vec<f32>], dim: usize, what: &str) -> Result<Vec<f32>> {
    let mut flat = Vec::with_capacity(x.len() * dim);
    for (r, row) in x.iter().enumerate() {
        ensure!(
            row.len() == dim,
            "{what}: row {r} has {} features, expected {dim}",
            row.len()
        );
        if let Some(c) = row.iter().position(|v| !v.is_finite()) {
            bail!("{what}: row {r} feature {c} is not finite ({})", row[c]);
        }
        flat.extend_from_slice(row);
    }
    Ok(flat)
}

impl Probe {
    /// The classifier's shape.
    pub fn kind(&self) -> ProbeKind {
        self.kind
    }

    /// Length of a feature row.
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// The device the probe's tensors live on.
    pub fn device(&self) -> &Device {
        self.out.weight.device()
    }

    /// Standardised features `(n, input_dim)` on the probe's device.
    fn features(&self, x: &[Vec<f32>]) -> Result<Tensor> {
        let flat = flatten(x, self.input_dim, "gate probe features")?;
        Ok(
            Tensor::from_vec(flat, (x.len(), self.input_dim), self.device())?
                .broadcast_sub(&self.mean)?
                .broadcast_div(&self.std)?,
        )
    }

    fn logits(&self, x: &[Vec<f32>]) -> Result<Tensor> {
        let xs = self.features(x)?;
        Ok(forward(
            &xs,
            self.hidden.as_ref().map(|l| (&l.weight, &l.bias)),
            (&self.out.weight, &self.out.bias),
            None,
        )?)
    }

    /// Class probabilities for each feature row (`classes` values summing to 1 per row).
    pub fn predict_proba(&self, x: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if x.is_empty() {
            return Ok(Vec::new());
        }
        let probs = candle_nn::ops::softmax_last_dim(&self.logits(x)?)?;
        Ok(probs.to_vec2::<f32>()?)
    }

    /// The most likely class of each row (ties: lowest index).
    pub fn predict(&self, x: &[Vec<f32>]) -> Result<Vec<usize>> {
        Ok(self.predict_proba(x)?.iter().map(|p| argmax(p)).collect())
    }

    fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let (code, hidden) = match self.kind {
            ProbeKind::Logistic => (0u32, 0usize),
            ProbeKind::Mlp { hidden } => (1, hidden),
        };
        let meta = [
            FORMAT_VERSION,
            code,
            self.input_dim as u32,
            self.classes as u32,
            hidden as u32,
        ];
        let mut map = HashMap::new();
        map.insert(META.to_string(), Tensor::new(&meta, self.device())?);
        map.insert(MEAN.to_string(), self.mean.clone());
        map.insert(STD.to_string(), self.std.clone());
        map.insert(OUT_W.to_string(), self.out.weight.clone());
        map.insert(OUT_B.to_string(), self.out.bias.clone());
        if let Some(h) = &self.hidden {
            map.insert(HIDDEN_W.to_string(), h.weight.clone());
            map.insert(HIDDEN_B.to_string(), h.bias.clone());
        }
        Ok(map)
    }

    /// Writes the probe as safetensors: `gate.meta` (u32: format version, kind 0 = logistic /
    /// 1 = MLP, input dim, classes, hidden width), `norm.mean`, `norm.std`, `out.weight`
    /// `(classes, in)`, `out.bias`, and for an MLP `hidden.weight` `(hidden, input_dim)`,
    /// `hidden.bias`.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.tensors()?, path)
            .with_context(|| format!("writing gate probe {}", path.display()))
    }

    /// Reads a probe written by [`Probe::save`] onto `device`. A file that is not safetensors,
    /// lacks a tensor, has an unexpected one, or whose shapes disagree with its metadata is an
    /// error.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let map = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading gate probe {}", path.display()))?;
        Self::from_tensors(map).with_context(|| format!("gate probe {}", path.display()))
    }

    fn from_tensors(mut map: HashMap<String, Tensor>) -> Result<Self> {
        let meta = map
            .remove(META)
            .with_context(|| format!("missing tensor `{META}`"))?;
        ensure!(
            meta.dtype() == DType::U32 && meta.dims() == [5],
            "tensor `{META}` should be u32 [5], is {:?} {:?}",
            meta.dtype(),
            meta.dims()
        );
        let meta = meta.to_vec1::<u32>()?;
        ensure!(
            meta[0] == FORMAT_VERSION,
            "format version {} is not {FORMAT_VERSION}",
            meta[0]
        );
        let (input_dim, classes, hidden) = (meta[2] as usize, meta[3] as usize, meta[4] as usize);
        let kind = match (meta[1], hidden) {
            (0, 0) => ProbeKind::Logistic,
            (1, h) if h > 0 => ProbeKind::Mlp { hidden: h },
            (k, h) => bail!("bad kind {k} / hidden width {h} in `{META}`"),
        };
        ensure!(
            input_dim > 0 && classes >= 2,
            "bad input dim {input_dim} / classes {classes} in `{META}`"
        );
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = map
                .remove(name)
                .with_context(|| format!("missing tensor `{name}`"))?;
            ensure!(
                t.dims() == shape,
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.dims()
            );
            ensure!(
                t.dtype().is_float(),
                "tensor `{name}` has dtype {:?}, expected a float",
                t.dtype()
            );
            let t = t.to_dtype(DType::F32)?;
            let finite = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            ensure!(finite, "tensor `{name}` has non-finite values");
            Ok(t)
        };
        let mean = take(MEAN, &[input_dim])?;
        let std = take(STD, &[input_dim])?;
        let (hidden, out_in) = match kind {
            ProbeKind::Logistic => (None, input_dim),
            ProbeKind::Mlp { hidden } => (
                Some(Linear {
                    weight: take(HIDDEN_W, &[hidden, input_dim])?,
                    bias: take(HIDDEN_B, &[hidden])?,
                }),
                hidden,
            ),
        };
        let out = Linear {
            weight: take(OUT_W, &[classes, out_in])?,
            bias: take(OUT_B, &[classes])?,
        };
        ensure!(
            std.to_vec1::<f32>()?.iter().all(|&s| s > 0.0),
            "tensor `{STD}` has non-positive values"
        );
        if !map.is_empty() {
            let mut extra: Vec<_> = map.keys().cloned().collect();
            extra.sort();
            bail!("unexpected tensors {extra:?} for a {kind:?} probe");
        }
        Ok(Self {
            kind,
            input_dim,
            classes,
            mean,
            std,
            hidden,
            out,
        })
    }
}
