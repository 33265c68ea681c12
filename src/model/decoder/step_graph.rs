//! Decode steps of a batch of up to `slots` sequences, each step's inputs written in place on
//! the device: on a GPU (`[model] cuda_graphs`), the first step runs the ops and captures them
//! as a graph, and every later step replays that graph with one launch. Elsewhere, or where
//! capture fails, each step runs [`Decoder::device_step`] (the same ops, launched one by one).
//!
//! A graph reads fixed buffers: the tokens and positions, each layer's row table, and the
//! rows' stacked LoRA factors. Rows join and leave by rewriting those in place, not by making
//! a new graph (what vLLM does with its persistent batch): a sequence keeps its slot while it
//! runs, a slot no sequence holds is a ghost (it writes and reads a one-position cache of its
//! own, and its logits are dropped), a new sequence's cache goes into the table and its
//! adapter's factors are copied into its slot's place in the stacks (`Gathered::restack`).
//! What a captured graph cannot take (more rows than slots, a longer cache than it was sized
//! for, adapters its stacks do not hold) [`StepGraph::serves`] says no to, and whoever holds
//! it makes a new one.

use candle_core::{DType, Result, Tensor, TensorId};

use super::{on_pool, Adapter, Cache, Decoder, ForwardOpts, Gathered, Logits, PerRow};
use crate::model::kernels::cache_rows::CacheRows;

pub struct StepGraph {
    /// `(slots,)` u32 each: the tokens a step continues with and their positions.
    ids: Tensor,
    positions: Tensor,
    /// One per layer, a row per slot.
    rows: Vec<CacheRows>,
    /// Each slot's cache, by the identity of its first layer's key buffer; `None` for a ghost.
    slots: Vec<Option<TensorId>>,
    /// A ghost slot's key and value buffers, per layer: one position, always position 0.
    ghost: Vec<(Tensor, Tensor)>,
    /// Whether [`release`](Self::release) changed the slots since the last step.
    released: bool,
    /// The slots' stacked LoRA factors: what a captured step reads, rewritten in place.
    gathered: Gathered,
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
        Self::with_slots(dec, caches, room, caches.len())
    }

    /// As [`new`](Self::new), with `slots` rows (at least one per cache): the rest are
    /// ghosts until sequences join. Caches bound later may hold as many positions as the
    /// largest of these rounded up to a power of two (where the device's step takes it).
    pub fn with_slots(
        dec: &Decoder,
        caches: &mut [&mut Cache],
        room: usize,
        slots: usize,
    ) -> Result<Self> {
        if caches.is_empty() || slots < caches.len() {
            candle_core::bail!("step graph: {} sequences in {slots} slots", caches.len());
        }
        for c in caches.iter_mut() {
            c.reserve(c.len() + room)?;
        }
        let capacity = caches.iter().map(|c| c.capacity()).max().unwrap_or(0);
        let Some(bound) = [capacity.next_power_of_two(), capacity]
            .into_iter()
            .find(|&b| dec.device_steps_serve(b))
        else {
            candle_core::bail!(
                "device steps do not serve caches of {capacity} positions on {:?}",
                dec.device()
            );
        };
        let ghost = (0..dec.blocks.len())
            .map(|l| {
                let (k, v) = buffers(caches[0], l)?;
                Ok((
                    k.narrow(2, 0, 1)?.zeros_like()?,
                    v.narrow(2, 0, 1)?.zeros_like()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let ids = Tensor::zeros(slots, DType::U32, dec.device())?;
        let positions = Tensor::zeros(slots, DType::U32, dec.device())?;
        let mut held: Vec<Option<TensorId>> = vec![None; slots];
        for (s, c) in caches.iter().enumerate() {
            held[s] = Some(identity(c)?);
        }
        let shared: Vec<&Cache> = caches.iter().map(|c| &**c).collect();
        let rows = (0..dec.blocks.len())
            .map(|l| {
                let b = slot_buffers(&held, &shared, &ghost, l)?;
                CacheRows::with_bound(b, &positions, bound)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            ids,
            positions,
            rows,
            slots: held,
            ghost,
            released: false,
            gathered: Gathered::default(),
            #[cfg(feature = "cuda")]
            replay: match dec.device() {
                candle_core::Device::Cuda(_) if crate::model::kernels::cuda::graph::enabled() => {
                    Replay::Pending
                }
                _ => Replay::Off,
            },
        })
    }

    /// Whether batches on `dec`'s device should be padded with ghost slots to a size class (a
    /// power of two), as vLLM pads its batches to the sizes it captured: on a GPU that
    /// captures steps, so that rows joining and leaving rebind a graph rather than make one.
    /// Elsewhere a ghost costs its arithmetic and saves nothing.
    pub fn pads(dec: &Decoder) -> bool {
        #[cfg(feature = "cuda")]
        if dec.device().is_cuda() && crate::model::kernels::cuda::graph::enabled() {
            return true;
        }
        let _ = dec;
        false
    }

    /// Rows this graph steps, live or ghost.
    pub fn slots(&self) -> usize {
        self.slots.len()
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

    /// Whether [`step`](Self::step) can take these rows (with these adapters, row for row):
    /// no more than the slots, every cache holding something and within the positions the
    /// graph was sized for, and once captured, adapters whose factors its stacks can hold.
    pub fn serves(&self, caches: &[&Cache], adapters: &[Option<&dyn Adapter>]) -> bool {
        let bound = self.rows[0].bound();
        if caches.len() > self.slots() || adapters.len() != caches.len() {
            return false;
        }
        if !caches
            .iter()
            .all(|c| c.capacity() <= bound && identity(c).is_ok())
        {
            return false;
        }
        if !self.captured() {
            return true;
        }
        let Ok(placed) = self.placed(caches) else {
            return false;
        };
        // A row already in its slot has its factors there (a sequence's adapter is its own for
        // its life): only newcomers' must fit. Checked per step, so kept to what changed.
        let newcomers: Vec<Option<&dyn Adapter>> = placed
            .iter()
            .zip(caches.iter().zip(adapters))
            .map(|(&s, (c, a))| match self.slots[s] == identity(c).ok() {
                true => None,
                false => *a,
            })
            .collect();
        let slotted = in_slots(&placed, &newcomers, self.slots());
        self.gathered.restackable(&slotted, self.rows.len())
    }

    /// One token of every row: `tokens[r]` continues the sequence cached in `caches[r]`,
    /// through `adapters[r]`. A cache new to the graph takes a free slot; a slot whose cache
    /// is not among these becomes a ghost. Returns `(rows, vocab)` logits, row for row, and
    /// counts the new position in each cache; and whether the slots' caches changed since the
    /// last step (the graph was rebound to other rows).
    pub fn step(
        &mut self,
        dec: &Decoder,
        tokens: &[u32],
        caches: &mut [&mut Cache],
        adapters: &[Option<&dyn Adapter>],
    ) -> Result<(Tensor, bool)> {
        if tokens.len() != caches.len() || adapters.len() != caches.len() {
            candle_core::bail!(
                "step graph: {} tokens, {} caches and {} adapters",
                tokens.len(),
                caches.len(),
                adapters.len()
            );
        }
        let shared: Vec<&Cache> = caches.iter().map(|c| &**c).collect();
        let placed = self.placed(&shared)?;
        let mut held: Vec<Option<TensorId>> = vec![None; self.slots()];
        for (r, &s) in placed.iter().enumerate() {
            held[s] = Some(identity(shared[r])?);
        }
        let moved = held != self.slots;
        let rebound = moved || std::mem::take(&mut self.released);
        if moved {
            self.bind(held, &shared)?;
        }
        let slotted = in_slots(&placed, adapters, self.slots());
        // The same sequences in the same slots have the same adapters: nothing to restack (a
        // check over every row and projection would cost each token).
        if rebound && !self.gathered.restack_if_fits(&slotted, self.rows.len())? && self.captured()
        {
            candle_core::bail!("step graph: these rows' adapters do not fit its stacks");
        }
        let (mut host_ids, mut host_positions) =
            (vec![0u32; self.slots()], vec![0u32; self.slots()]);
        for (r, &s) in placed.iter().enumerate() {
            let p = shared[r].len();
            if p + 1 > shared[r].capacity() || p + 1 > dec.config().max_position_embeddings {
                candle_core::bail!(
                    "step graph: position {p} is past the room reserved ({}) or the context",
                    shared[r].capacity()
                );
            }
            (host_ids[s], host_positions[s]) = (tokens[r], p as u32);
        }
        let any = slotted.iter().any(Option::is_some);
        let per_row = PerRow::with_cache(slotted, &self.gathered);
        let opts = ForwardOpts {
            logits: Logits::Last,
            adapter: if any { Some(&per_row) } else { None },
            ..Default::default()
        };
        let (ids, positions, rows) = (&self.ids, &self.positions, &self.rows);
        #[cfg(feature = "cuda")]
        let replay = &mut self.replay;
        let logits = on_pool(dec.device(), || -> Result<Tensor> {
            // Queued ahead of the step that reads them, on the same thread's stream.
            ids.slice_set(&Tensor::new(host_ids.as_slice(), dec.device())?, 0, 0)?;
            positions.slice_set(&Tensor::new(host_positions.as_slice(), dec.device())?, 0, 0)?;
            let step = || dec.device_step(ids, positions, rows, &opts);
            #[cfg(feature = "cuda")]
            return run(dec, replay, step);
            #[cfg(not(feature = "cuda"))]
            step()
        })?;
        for c in caches.iter_mut() {
            c.advance(1)?;
        }
        let in_order = placed.iter().enumerate().all(|(r, &s)| r == s);
        let logits = match (in_order, placed.len() == self.slots()) {
            (true, true) => logits,
            (true, false) => logits.narrow(0, 0, placed.len())?,
            _ => {
                let at: Vec<u32> = placed.iter().map(|&s| s as u32).collect();
                logits.index_select(&Tensor::new(at, dec.device())?, 0)?
            }
        };
        Ok((logits, rebound))
    }

    /// Lets go of every slot whose cache is not among `live` (its buffers, which the KV budget
    /// already counts as free): those slots become ghosts.
    pub fn release(&mut self, live: &[&Cache]) -> Result<()> {
        let ids: Vec<TensorId> = live.iter().filter_map(|c| identity(c).ok()).collect();
        let mut held = self.slots.clone();
        for s in held.iter_mut() {
            if s.is_some_and(|id| !ids.contains(&id)) {
                *s = None;
            }
        }
        if held == self.slots {
            return Ok(());
        }
        self.bind(held, live)?;
        self.released = true;
        Ok(())
    }

    /// Points every layer's rows at the slots' caches as `held` names them (found among
    /// `caches`; a ghost where none is named).
    fn bind(&mut self, held: Vec<Option<TensorId>>, caches: &[&Cache]) -> Result<()> {
        for (l, rows) in self.rows.iter_mut().enumerate() {
            rows.rebind(slot_buffers(&held, caches, &self.ghost, l)?)?;
        }
        self.slots = held;
        Ok(())
    }

    /// Each cache's slot: the one it holds, else the lowest slot no cache of these holds.
    fn placed(&self, caches: &[&Cache]) -> Result<Vec<usize>> {
        let ids = caches
            .iter()
            .map(|c| identity(c))
            .collect::<Result<Vec<_>>>()?;
        let mut taken: Vec<bool> = self
            .slots
            .iter()
            .map(|s| s.is_some_and(|id| ids.contains(&id)))
            .collect();
        let mut placed = Vec::with_capacity(ids.len());
        for id in &ids {
            let s = match self.slots.iter().position(|s| *s == Some(*id)) {
                Some(s) => s,
                None => match taken.iter().position(|t| !t) {
                    Some(s) => s,
                    None => candle_core::bail!(
                        "step graph: {} sequences for {} slots",
                        ids.len(),
                        self.slots()
                    ),
                },
            };
            if placed.contains(&s) {
                candle_core::bail!("step graph: one cache in two rows");
            }
            taken[s] = true;
            placed.push(s);
        }
        Ok(placed)
    }
}

/// The step's ops, or the graph of them: captured at the first step on a GPU, replayed after.
#[cfg(feature = "cuda")]
fn run(dec: &Decoder, replay: &mut Replay, step: impl Fn() -> Result<Tensor>) -> Result<Tensor> {
    use crate::model::kernels::cuda::graph::{with_upload_cache, Graph};
    let candle_core::Device::Cuda(dev) = dec.device().clone() else {
        return step();
    };
    match &*replay {
        Replay::Captured(g) => match g.replay() {
            // A copy: the buffer is the next replay's.
            Ok(out) => return out.copy(),
            Err(e) => {
                give_up("replay", &e);
                *replay = Replay::Off;
            }
        },
        Replay::Off => {}
        Replay::Pending => {
            let logits = with_upload_cache(&dev, &step)?;
            let out = logits.zeros_like()?;
            *replay = match Graph::capture(&dev, out, &step) {
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

/// `adapters[r]` in row `r`'s slot, `None` in the others.
fn in_slots<'a>(
    placed: &[usize],
    adapters: &[Option<&'a dyn Adapter>],
    slots: usize,
) -> Vec<Option<&'a dyn Adapter>> {
    let mut out = vec![None; slots];
    for (&s, a) in placed.iter().zip(adapters) {
        out[s] = *a;
    }
    out
}

/// Layer `l`'s buffers of each slot: the cache among `caches` that `held` names there, or the
/// ghost's.
fn slot_buffers(
    held: &[Option<TensorId>],
    caches: &[&Cache],
    ghost: &[(Tensor, Tensor)],
    l: usize,
) -> Result<Vec<(Tensor, Tensor)>> {
    held.iter()
        .map(|s| {
            let c = s.and_then(|id| caches.iter().find(|c| identity(c).ok() == Some(id)));
            match c {
                Some(c) => buffers(c, l),
                None => Ok(ghost[l].clone()),
            }
        })
        .collect()
}

fn buffers(c: &Cache, l: usize) -> Result<(Tensor, Tensor)> {
    match c.layers.get(l).and_then(|l| l.buffers()) {
        Some(b) => Ok(b.clone()),
        None => candle_core::bail!("step graph: a cache holds nothing yet"),
    }
}

fn identity(c: &Cache) -> Result<TensorId> {
    match c.layers.first().and_then(|l| l.buffers()) {
        Some((k, _)) => Ok(k.id()),
        None => candle_core::bail!("step graph: a cache holds nothing yet"),
    }
}
