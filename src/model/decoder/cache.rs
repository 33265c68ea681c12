//! A request's own key/value cache.

use candle_core::{Result, Tensor};

use crate::model::ModelConfig;

/// Per-sequence key/value cache, one entry per layer. Owned by a request, never by the model,
/// so concurrent requests share the weights and nothing else.
pub struct Cache {
    pub(super) layers: Vec<LayerCache>,
}

/// One layer's keys and values, `(1, kv_heads, capacity, head_dim)` buffers written in place.
/// candle_nn's `KvCache` has the same buffers but only appends at an offset it keeps on the
/// host; a captured decode step writes at a position held on the device and the host counts
/// afterwards ([`Cache::advance`]), which its private length cannot follow.
pub(super) struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
}

impl LayerCache {
    fn new(capacity: usize) -> Self {
        Self {
            kv: None,
            len: 0,
            capacity: capacity.max(1),
        }
    }

    /// Writes `k`, `v` (`(1, kv_heads, t, head_dim)`) after what the layer holds, growing the
    /// buffers (by their capacity again, as often as needed) where they lack room; returns
    /// views of everything held.
    pub(super) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        self.reserve_like(k, self.len + t)?;
        let (kb, vb) = self.kv.as_ref().expect("reserved");
        kb.slice_set(k, 2, self.len)?;
        vb.slice_set(v, 2, self.len)?;
        self.len += t;
        Ok((kb.narrow(2, 0, self.len)?, vb.narrow(2, 0, self.len)?))
    }

    /// Makes room for `total` positions in buffers shaped like `like` (a key block).
    fn reserve_like(&mut self, like: &Tensor, total: usize) -> Result<()> {
        let zeros = |n: usize| {
            let mut shape = like.dims().to_vec();
            shape[2] = n;
            Tensor::zeros(shape, like.dtype(), like.device())
        };
        if self.kv.is_none() {
            self.kv = Some((zeros(self.capacity)?, zeros(self.capacity)?));
        }
        let grow_by = self.capacity;
        while total > self.capacity {
            self.capacity += grow_by;
        }
        let (k, v) = self.kv.as_mut().expect("allocated above");
        let held = k.dim(2)?;
        if self.capacity > held {
            let extra = self.capacity - held;
            *k = Tensor::cat(&[&*k, &zeros(extra)?], 2)?;
            *v = Tensor::cat(&[&*v, &zeros(extra)?], 2)?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn k(&self) -> Result<Option<Tensor>> {
        self.kv
            .as_ref()
            .map(|(k, _)| k.narrow(2, 0, self.len))
            .transpose()
    }

    /// The whole buffers, written or not: where a captured step writes and reads.
    pub(super) fn buffers(&self) -> Option<&(Tensor, Tensor)> {
        self.kv.as_ref()
    }
}

impl Cache {
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Self {
        Self {
            layers: (0..cfg.num_hidden_layers)
                .map(|_| LayerCache::new(capacity))
                .collect(),
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().map(|c| c.len).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Positions the buffers hold without growing.
    pub fn capacity(&self) -> usize {
        self.layers.first().map(|c| c.capacity).unwrap_or(0)
    }

    /// Grows every layer's buffers to hold `total` positions, so that steps written on the
    /// device up to there never move them. Needs something cached (the buffers' shape).
    pub fn reserve(&mut self, total: usize) -> Result<()> {
        for l in &mut self.layers {
            let Some((k, _)) = l.kv.clone() else {
                candle_core::bail!("reserve: the cache holds nothing yet");
            };
            l.reserve_like(&k.narrow(2, 0, 1)?, total)?;
        }
        Ok(())
    }

    /// Counts `n` positions a step wrote on the device (`Decoder::device_step`) as held.
    pub fn advance(&mut self, n: usize) -> Result<()> {
        for l in &mut self.layers {
            if l.len + n > l.capacity || l.kv.is_none() {
                candle_core::bail!(
                    "advance: {} + {n} positions exceed the cache's {}",
                    l.len,
                    l.capacity
                );
            }
            l.len += n;
        }
        Ok(())
    }

    /// A deep copy with room for `extra` more positions. The buffers are written in place, so
    /// a plain clone would share them and two continuations written after the same prefix
    /// would overwrite each other.
    pub fn fork(&self, extra: usize) -> Result<Self> {
        let cap = self.len() + extra.max(1);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut c = LayerCache::new(cap);
                if let Some((k, v)) = &l.kv {
                    if l.len > 0 {
                        c.append(
                            &k.narrow(2, 0, l.len)?.contiguous()?,
                            &v.narrow(2, 0, l.len)?.contiguous()?,
                        )?;
                    }
                }
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}
