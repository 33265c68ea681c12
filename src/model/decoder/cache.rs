//! A request's own key/value cache.

use candle_core::Result;
use candle_nn::kv_cache::KvCache;

use crate::model::ModelConfig;

/// Per-sequence key/value cache, one entry per layer. Owned by a request, never by the model,
/// so concurrent requests share the weights and nothing else.
pub struct Cache {
    pub(super) layers: Vec<KvCache>,
}

impl Cache {
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Self {
        Self {
            layers: (0..cfg.num_hidden_layers)
                .map(|_| KvCache::new(2, capacity.max(1)))
                .collect(),
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map(|c| c.current_seq_len())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A deep copy with room for `extra` more positions. candle's cache appends in place into
    /// a preallocated buffer, so a plain `clone` would share it and two continuations written
    /// after the same prefix would overwrite each other.
    pub fn fork(&self, extra: usize) -> Result<Self> {
        let cap = self.len() + extra.max(1);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut c = KvCache::new(2, cap);
                if let (Some(k), Some(v)) = (l.k()?, l.v()?) {
                    c.append(&k.contiguous()?, &v.contiguous()?)?;
                }
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}
