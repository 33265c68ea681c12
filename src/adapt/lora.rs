//! Per-request low-rank adapters: `W x + (alpha / r) * B (A x)` on chosen projections. The base
//! weights are never written; an adapter lives in the request that created it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::model::{fused, Adapter, LowRank, ModelConfig, Target};

/// Shape of the adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Target>,
    /// Dropout on the adapter's input during training steps.
    pub dropout: f64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Q, Target::V],
            dropout: 0.0,
        }
    }
}

/// A target's name, as [`parse_target`] reads it.
pub fn target_name(t: Target) -> &'static str {
    match t {
        Target::Q => "q",
        Target::K => "k",
        Target::V => "v",
        Target::O => "o",
        Target::Gate => "gate",
        Target::Up => "up",
        Target::Down => "down",
    }
}

/// Parses a target name (`q`, `k`, `v`, `o`, `gate`, `up`, `down`).
pub fn parse_target(s: &str) -> Option<Target> {
    Some(match s {
        "q" => Target::Q,
        "k" => Target::K,
        "v" => Target::V,
        "o" => Target::O,
        "gate" => Target::Gate,
        "up" => Target::Up,
        "down" => Target::Down,
        _ => return None,
    })
}

/// `(in, out)` features of a projection.
pub(super) fn dims(cfg: &ModelConfig, t: Target) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    match t {
        Target::Q | Target::O => (h, h),
        Target::K | Target::V => (h, kv),
        Target::Gate | Target::Up => (h, i),
        Target::Down => (i, h),
    }
}

/// Low-rank adapters: `A` (rank, in) and `B` (out, rank) per (layer, target). A trainable one
/// (a request's) holds its matrices as variables; a frozen one (a collection's domain adapter,
/// shared by every request on it) as plain tensors, which take no gradient.
pub struct Lora {
    a: HashMap<(usize, Target), Tensor>,
    b: HashMap<(usize, Target), Tensor>,
    /// The variables behind `a` and `b`, in creation order; empty when frozen.
    vars: Vec<Var>,
    scale: f64,
    dropout: f64,
    /// Mask seed of the training step under way; [`NO_STEP`] outside training (no dropout).
    step: AtomicU64,
    /// This instance's number, never reused (see [`LowRank::id`]).
    id: u64,
}

/// The next [`Lora::id`].
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

const NO_STEP: u64 = u64::MAX;

fn tensor_name(layer: usize, t: Target, which: &str) -> String {
    format!("layers.{layer}.{}.{which}", target_name(t))
}

impl Lora {
    /// A fresh adapter: `A` uniform in +-1/sqrt(in) (Kaiming, as PEFT), `B` zero, so the
    /// adapted model starts exactly equal to the base model.
    pub fn new(
        model: &ModelConfig,
        cfg: &LoraConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut a, mut b, mut vars) = (HashMap::new(), HashMap::new(), Vec::new());
        for layer in 0..model.num_hidden_layers {
            for &t in &cfg.targets {
                let (inp, out) = dims(model, t);
                let bound = 1.0 / (inp as f32).sqrt();
                let data: Vec<f32> = (0..cfg.rank * inp)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                    .collect();
                let at = Tensor::from_vec(data, (cfg.rank, inp), device)?.to_dtype(dtype)?;
                let (va, vb) = (
                    Var::from_tensor(&at)?,
                    Var::zeros((out, cfg.rank), dtype, device)?,
                );
                a.insert((layer, t), va.as_tensor().clone());
                b.insert((layer, t), vb.as_tensor().clone());
                vars.extend([va, vb]);
            }
        }
        Ok(Self {
            a,
            b,
            vars,
            scale: cfg.alpha / cfg.rank as f64,
            dropout: cfg.dropout,
            step: AtomicU64::new(NO_STEP),
            id: next_id(),
        })
    }

    /// A frozen adapter from named matrices (see [`Lora::named_tensors`]), checked against the
    /// model's shapes; `cfg.targets` and `cfg.rank` must describe them.
    pub fn frozen_from(
        model: &ModelConfig,
        cfg: &LoraConfig,
        mut named: HashMap<String, Tensor>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let (mut a, mut b) = (HashMap::new(), HashMap::new());
        for layer in 0..model.num_hidden_layers {
            for &t in &cfg.targets {
                let (inp, out) = dims(model, t);
                for (which, shape, map) in [
                    ("a", (cfg.rank, inp), &mut a),
                    ("b", (out, cfg.rank), &mut b),
                ] {
                    let name = tensor_name(layer, t, which);
                    let m = named.remove(&name).ok_or_else(|| {
                        candle_core::Error::Msg(format!("adapter has no tensor `{name}`"))
                    })?;
                    if m.dims() != [shape.0, shape.1] {
                        candle_core::bail!(
                            "adapter tensor `{name}` is {:?}, the model needs {shape:?}",
                            m.dims()
                        );
                    }
                    map.insert((layer, t), m.to_device(device)?.to_dtype(dtype)?);
                }
            }
        }
        if let Some(extra) = named.keys().next() {
            candle_core::bail!(
                "adapter tensor `{extra}` belongs to no layer and target of the model"
            );
        }
        Ok(Self {
            a,
            b,
            vars: vec![],
            scale: cfg.alpha / cfg.rank as f64,
            dropout: 0.0,
            step: AtomicU64::new(NO_STEP),
            id: next_id(),
        })
    }

    /// Every matrix under a stable name (`layers.L.TARGET.a` / `.b`), for saving.
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        let a = self
            .a
            .iter()
            .map(|(&(l, t), m)| (tensor_name(l, t, "a"), m));
        let b = self
            .b
            .iter()
            .map(|(&(l, t), m)| (tensor_name(l, t, "b"), m));
        a.chain(b).map(|(n, m)| (n, m.clone())).collect()
    }

    /// The trainable variables, in a fixed order; none when frozen.
    pub fn vars(&self) -> Vec<Var> {
        self.vars.clone()
    }

    /// Bytes held by the adapter weights.
    pub fn bytes(&self) -> usize {
        self.a
            .values()
            .chain(self.b.values())
            .map(|v| v.elem_count() * v.dtype().size_in_bytes())
            .sum()
    }
}

/// The dropout mask (0 or 1/(1-p)) of one step, layer and projection. It is a function of
/// those alone, so a block recomputed for the backward pass sees its forward's mask. Drawn on
/// the host: candle's device generators are seeded per device, not per call, and requests run
/// concurrently.
fn dropout_mask(x: &Tensor, p: f64, step: u64, layer: usize, target: Target) -> Result<Tensor> {
    let key = step
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((layer as u64) << 8 | target as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(key);
    let keep = (1.0 / (1.0 - p)) as f32;
    let m: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
        .collect();
    Tensor::from_vec(m, x.shape(), x.device())?.to_dtype(x.dtype())
}

impl Adapter for Lora {
    fn begin_step(&self, step: Option<u64>) {
        self.step.store(
            step.map_or(NO_STEP, |s| s.min(NO_STEP - 1)),
            Ordering::Relaxed,
        );
    }

    fn low_rank(&self, layer: usize, target: Target) -> Option<LowRank<'_>> {
        if !self.is_low_rank() {
            return None;
        }
        Some(LowRank {
            id: self.id,
            a: self.a.get(&(layer, target))?,
            b: self.b.get(&(layer, target))?,
            scale: self.scale,
        })
    }

    fn is_low_rank(&self) -> bool {
        // Inside a training step with dropout the delta is not `B A x`.
        !(self.dropout > 0.0 && self.step.load(Ordering::Relaxed) != NO_STEP)
    }

    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let (Some(a), Some(b)) = (self.a.get(&(layer, target)), self.b.get(&(layer, target)))
        else {
            return Ok(None);
        };
        let step = self.step.load(Ordering::Relaxed);
        let dropped;
        let x = if self.dropout > 0.0 && step != NO_STEP {
            dropped = (x * dropout_mask(x, self.dropout, step, layer, target)?)?;
            &dropped
        } else {
            x
        };
        // On a GPU with the fused training path, one op each way (a launch forward, two
        // backward) instead of about a dozen.
        if fused::lora_takes(x, a, b) {
            return Ok(Some(fused::lora_delta(x, a, b, self.scale)?));
        }
        let h = x.broadcast_matmul(&a.t()?)?;
        let y = h.broadcast_matmul(&b.t()?)?;
        Ok(Some((y * self.scale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::tiny_parts;
    use crate::model::Arch;

    #[test]
    fn dropout_acts_only_inside_a_training_step_and_repeats_within_it() {
        let parts = tiny_parts(Arch::Llama, 1, &Device::Cpu, DType::F32).unwrap();
        let cfg = LoraConfig {
            dropout: 0.5,
            ..Default::default()
        };
        let lora = Lora::new(&parts.config, &cfg, 4, &Device::Cpu, DType::F32).unwrap();
        // Non-zero B so the delta is not identically zero.
        for v in lora.vars.iter().filter(|v| v.dims()[1] == cfg.rank) {
            v.set(&v.ones_like().unwrap()).unwrap();
        }
        let h = parts.config.hidden_size;
        let x = Tensor::ones((2, 16, h), DType::F32, &Device::Cpu).unwrap();
        let delta = |layer| {
            lora.delta(layer, Target::Q, &x)
                .unwrap()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let clean = delta(0);
        lora.begin_step(Some(7));
        let (a, again) = (delta(0), delta(0));
        assert_eq!(a, again, "a recomputed block must see the same mask");
        assert_ne!(a, clean);
        assert_ne!(delta(1), a, "layers draw their own masks");
        lora.begin_step(Some(8));
        assert_ne!(delta(0), a, "steps draw their own masks");
        lora.begin_step(None);
        assert_eq!(delta(0), clean, "no dropout outside training");

        // About half of the inputs are dropped and the rest scaled by 2.
        let m = dropout_mask(&x, 0.5, 3, 0, Target::V)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let zeros = m.iter().filter(|&&v| v == 0.0).count() as f64 / m.len() as f64;
        assert!((zeros - 0.5).abs() < 0.05, "{zeros}");
        assert!(m.iter().all(|&v| v == 0.0 || v == 2.0));
    }
}
