//! Per-request low-rank adapters: `W x + (alpha / r) * B (A x)` on chosen projections. The base
//! weights are never written; an adapter lives in the request that created it.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

use crate::model::{Adapter, ModelConfig, Target};

/// Shape of the adapters.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<Target>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            targets: vec![Target::Q, Target::V],
        }
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
fn dims(cfg: &ModelConfig, t: Target) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    match t {
        Target::Q | Target::O => (h, h),
        Target::K | Target::V => (h, kv),
        Target::Gate | Target::Up => (h, i),
        Target::Down => (i, h),
    }
}

/// One request's adapters: `A` (rank, in) and `B` (out, rank) per (layer, target).
pub struct Lora {
    a: HashMap<(usize, Target), Var>,
    b: HashMap<(usize, Target), Var>,
    scale: f64,
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
        let (mut a, mut b) = (HashMap::new(), HashMap::new());
        for layer in 0..model.num_hidden_layers {
            for &t in &cfg.targets {
                let (inp, out) = dims(model, t);
                let bound = 1.0 / (inp as f32).sqrt();
                let data: Vec<f32> = (0..cfg.rank * inp)
                    .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                    .collect();
                let at = Tensor::from_vec(data, (cfg.rank, inp), device)?.to_dtype(dtype)?;
                a.insert((layer, t), Var::from_tensor(&at)?);
                b.insert((layer, t), Var::zeros((out, cfg.rank), dtype, device)?);
            }
        }
        Ok(Self {
            a,
            b,
            scale: cfg.alpha / cfg.rank as f64,
        })
    }

    /// The trainable variables.
    pub fn vars(&self) -> Vec<Var> {
        self.a.values().chain(self.b.values()).cloned().collect()
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

impl Adapter for Lora {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let (Some(a), Some(b)) = (self.a.get(&(layer, target)), self.b.get(&(layer, target)))
        else {
            return Ok(None);
        };
        let h = x.broadcast_matmul(&a.as_tensor().t()?)?;
        let y = h.broadcast_matmul(&b.as_tensor().t()?)?;
        Ok(Some((y * self.scale)?))
    }
}
