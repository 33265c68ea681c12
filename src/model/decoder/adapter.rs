//! What a request may add to the shared weights: an adapter's delta on named projections, and
//! one adapter per row of a batch.

use candle_core::{Result, Tensor};

/// The linear projections an adapter can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// A per-request additive change to some projections (e.g. LoRA): `y = W x + delta(x)`.
/// The base weights stay shared and untouched.
pub trait Adapter: Sync {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>>;

    /// A training step begins (`Some(seed)`, e.g. for dropout masks) or training is over
    /// (`None`: inference behaviour).
    fn begin_step(&self, _step: Option<u64>) {}
}

/// Adapters of a batch, one per row (`None`: the base model): each row's delta is computed
/// from that row alone, so no row's adapter touches another row. Rows are gathered per
/// sequence, with no merged weights.
pub struct PerRow<'a>(pub Vec<Option<&'a dyn Adapter>>);

impl Adapter for PerRow<'_> {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let rows = x.dim(0)?;
        if rows != self.0.len() {
            candle_core::bail!("{} adapters for a batch of {rows} rows", self.0.len());
        }
        let mut deltas = Vec::with_capacity(rows);
        for (i, a) in self.0.iter().enumerate() {
            deltas.push(match a {
                Some(a) => a.delta(layer, target, &x.narrow(0, i, 1)?)?,
                None => None,
            });
        }
        let Some(shape) = deltas.iter().flatten().next().map(|d| d.shape().clone()) else {
            return Ok(None);
        };
        let zeros = Tensor::zeros(shape, x.dtype(), x.device())?;
        let rows: Vec<Tensor> = deltas
            .into_iter()
            .map(|d| d.unwrap_or_else(|| zeros.clone()))
            .collect();
        Ok(Some(Tensor::cat(&rows, 0)?))
    }

    fn begin_step(&self, step: Option<u64>) {
        for a in self.0.iter().flatten() {
            a.begin_step(step);
        }
    }
}
