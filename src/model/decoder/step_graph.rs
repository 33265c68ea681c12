//! Decode steps of a fixed set of sequences, each step's inputs written in place on the
//! device: on a GPU (`[model] cuda_graphs`), the first step runs the ops and captures them as
//! a graph, and every later step replays that graph with one launch. Elsewhere, or where
//! capture fails, each step runs [`Decoder::device_step`] (the same ops, launched one by one).
//!
//! A `StepGraph` serves one batch composition for its life: the same sequences in the same
//! rows, each with the adapter it had at the first step (a graph reads the very buffers the
//! first step read). Whoever changes the rows makes a new one.

use candle_core::{DType, Result, Tensor, TensorId};

use super::{on_pool, Cache, Decoder, ForwardOpts};
use crate::model::kernels::cache_rows::CacheRows;

pub struct StepGraph {
    /// `(rows,)` u32 each: the tokens a step continues with and their positions.
    ids: Tensor,
    positions: Tensor,
    /// One per layer.
    rows: Vec<CacheRows>,
    /// Each row's cache, by the identity of its first layer's key buffer.
    caches: Vec<TensorId>,
    #[cfg(feature = "cuda")]
    replay: Replay,
}

#[cfg(feature = "cuda")]
enum Replay {
    /// Not captured yet: the next step runs the ops and captures them.
    Pending,
    Captured(crate::model::kernels::cuda::graph::Graph),
    /// Not on a GPU, turned off, or the capture failed: every step runs the ops.
    Off,
}

impl StepGraph {
    /// Steps for `caches` (each holding its prefill), one row each, with room reserved for
    /// `room` more positions per sequence: the buffers must not move while the graph lives.
    pub fn new(dec: &Decoder, caches: &mut [&mut Cache], room: usize) -> Result<Self> {
        if caches.is_empty() {
            candle_core::bail!("step graph: no sequences");
        }
        for c in caches.iter_mut() {
            c.reserve(c.len() + room)?;
        }
        let n = caches.len();
        let ids = Tensor::zeros(n, DType::U32, dec.device())?;
        let positions = Tensor::zeros(n, DType::U32, dec.device())?;
        let shared: Vec<&Cache> = caches.iter().map(|c| &**c).collect();
        let rows = dec.cache_rows(&shared, &positions)?;
        Ok(Self {
            ids,
            positions,
            rows,
            caches: shared.iter().map(|c| identity(c)).collect::<Result<_>>()?,
            #[cfg(feature = "cuda")]
            replay: match dec.device() {
                candle_core::Device::Cuda(_) if crate::model::kernels::cuda::graph::enabled() => {
                    Replay::Pending
                }
                _ => Replay::Off,
            },
        })
    }

    /// Whether later steps replay a captured graph.
    pub fn captured(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let Replay::Captured(_) = self.replay {
            return true;
        }
        false
    }

    /// The captured graph's node count (what one replay launches), once captured.
    pub fn nodes(&self) -> Option<usize> {
        #[cfg(feature = "cuda")]
        if let Replay::Captured(g) = &self.replay {
            return g.nodes().ok();
        }
        None
    }

    /// One token of every row: `tokens[r]` continues the sequence cached in `caches[r]` (the
    /// caches this graph was made for, in the same order). Returns `(rows, vocab)` logits and
    /// counts the new position in each cache.
    pub fn step(
        &mut self,
        dec: &Decoder,
        tokens: &[u32],
        caches: &mut [&mut Cache],
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        if tokens.len() != self.caches.len() || caches.len() != self.caches.len() {
            candle_core::bail!(
                "step graph: {} tokens and {} caches for {} rows",
                tokens.len(),
                caches.len(),
                self.caches.len()
            );
        }
        let mut positions = Vec::with_capacity(caches.len());
        for (c, id) in caches.iter().zip(&self.caches) {
            if identity(c)? != *id {
                candle_core::bail!("step graph: a row's cache is not the one it was made for");
            }
            let p = c.len();
            if p + 1 > c.capacity() || p + 1 > dec.config().max_position_embeddings {
                candle_core::bail!(
                    "step graph: position {p} is past the room reserved ({}) or the context",
                    c.capacity()
                );
            }
            positions.push(p as u32);
        }
        let logits = on_pool(dec.device(), || -> Result<Tensor> {
            // Queued ahead of the step that reads them, on the same thread's stream.
            self.ids
                .slice_set(&Tensor::new(tokens, dec.device())?, 0, 0)?;
            let p = Tensor::new(positions.as_slice(), dec.device())?;
            self.positions.slice_set(&p, 0, 0)?;
            self.run(dec, opts)
        })?;
        for c in caches.iter_mut() {
            c.advance(1)?;
        }
        Ok(logits)
    }

    #[cfg(not(feature = "cuda"))]
    fn run(&mut self, dec: &Decoder, opts: &ForwardOpts) -> Result<Tensor> {
        dec.device_step(&self.ids, &self.positions, &self.rows, opts)
    }

    #[cfg(feature = "cuda")]
    fn run(&mut self, dec: &Decoder, opts: &ForwardOpts) -> Result<Tensor> {
        use crate::model::kernels::cuda::graph::{with_upload_cache, Graph};
        let (ids, positions, rows) = (&self.ids, &self.positions, &self.rows);
        let step = || dec.device_step(ids, positions, rows, opts);
        let candle_core::Device::Cuda(dev) = dec.device().clone() else {
            return step();
        };
        match &self.replay {
            Replay::Captured(g) => match g.replay() {
                // A copy: the buffer is the next replay's.
                Ok(out) => return out.copy(),
                Err(e) => {
                    give_up("replay", &e);
                    self.replay = Replay::Off;
                }
            },
            Replay::Off => {}
            Replay::Pending => {
                let logits = with_upload_cache(&dev, step)?;
                let out = logits.zeros_like()?;
                self.replay = match Graph::capture(&dev, out, step) {
                    Ok(g) => Replay::Captured(g),
                    Err(e) => {
                        give_up("capture", &e);
                        Replay::Off
                    }
                };
                return Ok(logits);
            }
        }
        step()
    }
}

/// A capture or replay that fails once would fail for every batch (an op that uploads, a
/// driver without graph support): graphs are turned off for the process, said once, and every
/// step graph runs its ops one by one from then on.
#[cfg(feature = "cuda")]
fn give_up(what: &str, e: &candle_core::Error) {
    use crate::model::kernels::cuda::graph;
    if graph::enabled() {
        graph::set_enabled(false);
        tracing::warn!("decode graph {what} failed ({e}); decode steps run op by op from now on");
    }
}

fn identity(c: &Cache) -> Result<TensorId> {
    match c.layers.first().and_then(|l| l.buffers()) {
        Some((k, _)) => Ok(k.id()),
        None => candle_core::bail!("step graph: a cache holds nothing yet"),
    }
}
