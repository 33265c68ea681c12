//! The decode scheduler: one thread owns every running sequence and advances them together.
//! Each iteration runs the waiting prompts' prefill chunks (within a token budget, so a long
//! prompt delays running answers by one chunk at most), samples every sequence that has
//! logits, and runs one batched decode step over all of them ([`Decoder::decode_step`], each
//! row with its own cache, position and adapter). Sequences join between iterations and
//! leave as soon as they finish, fail, or their client goes.
//!
//! Admission is bounded by `max_running` and by a KV-cache budget: a sequence reserves its
//! whole cache (prompt plus token budget) when admitted, so a running answer can never run
//! out of memory halfway. One that does not fit waits at the head of the line; one that could
//! never fit is refused. Hand-over from the stage workers is a bounded channel, so a full
//! scheduler backs up into the submit queue, which refuses with 429.
//!
//! Every row's arithmetic is independent of the others in its batch (see `decode_step`), and
//! prefill chunk boundaries are fixed per prompt, never chosen by load: a sequence gets the
//! same bits alone or batched.

use std::cell::RefCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use super::sequence::Sequence;
use super::{answer_panic, end_early, EngineError, Event, Faults, GraphUse, Health};
use crate::generate::{score_after_prefill, ContinuationScore, Decoding, GenError, Next};
use crate::model::{
    greedy_picks, Adapter, Cache, ForwardOpts, Logits, Model, PerRow, Pick, StepGraph,
};

/// How much the engine runs at once.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    /// Sequences admitted at once (prefilling or decoding).
    pub max_running: usize,
    /// Tokens one iteration may run: decode rows plus prefill chunk tokens. At least one
    /// chunk runs per iteration whatever this says, so prefill always progresses.
    pub max_batch_tokens: usize,
    /// Bytes all admitted sequences' KV caches may hold together.
    pub kv_cache_bytes: usize,
    /// Bytes adaptations in flight may reserve together (see [`super::memory`]); the stage
    /// workers reserve it, the scheduler only drops what finished sequences held.
    pub adapt_memory_bytes: usize,
    /// Prompt tokens per prefill pass. Fixed per prompt (never chosen by load), because
    /// chunking changes a prompt's rounding.
    pub prefill_chunk: usize,
    /// Decode steps through [`StepGraph`]s on any device. On a GPU with `[model] cuda_graphs`
    /// they are used whatever this says (captured once per batch, replayed per token); on the
    /// CPU they run the same ops one by one with the same bits, which is how tests reach them.
    pub step_graphs: bool,
    /// Step graphs' batches padded with ghost rows to a power of two on any device (on a GPU
    /// that captures, always: [`StepGraph::pads`]); on the CPU, how tests reach that path.
    pub pad_steps: bool,
}

impl BatchLimits {
    /// The limits `[server]` sets.
    pub fn of(server: &crate::config::ServerSection) -> Self {
        Self {
            max_running: server.max_running,
            max_batch_tokens: server.max_batch_tokens,
            kv_cache_bytes: server.kv_cache_mb.saturating_mul(1 << 20),
            adapt_memory_bytes: server.adapt_memory_mb.saturating_mul(1 << 20),
            prefill_chunk: server.prefill_chunk,
            step_graphs: false,
            pad_steps: false,
        }
    }
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_running: 16,
            max_batch_tokens: 512,
            kv_cache_bytes: 1 << 30,
            adapt_memory_bytes: 4 << 30,
            prefill_chunk: crate::generate::PREFILL_CHUNK,
            step_graphs: false,
            pad_steps: false,
        }
    }
}

struct Active {
    seq: Sequence,
    decoding: Decoding,
    cache: Cache,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    /// What the next token comes from, once the prompt is in.
    ready: Option<Ready>,
    /// The token sampled this iteration, to run in the decode step.
    next: Option<u32>,
    scores: Vec<ContinuationScore>,
    kv_bytes: usize,
    prefill_ms: f64,
    decode_from: Option<Instant>,
}

/// What a row samples its next token from.
enum Ready {
    /// Its own logits (the prompt's last position).
    Logits(Tensor),
    /// A greedy row's token and log-probability, picked with the step's other greedy rows.
    Picked(Pick),
    /// A sampled row's logits, copied to the host with the step's other sampled rows.
    Host(Vec<f32>),
}

/// Why a sequence leaves before finishing: `None` when its client went away.
type Leave = Option<EngineError>;

fn gen_error(e: GenError) -> EngineError {
    match e {
        e @ GenError::ContextExceeded { .. } => EngineError::ContextExceeded(e.to_string()),
        e => EngineError::Internal(e.to_string()),
    }
}

/// Whether `seq` may go on.
fn checkpoint(seq: &Sequence) -> Result<(), Leave> {
    super::may_go_on(&seq.reply, &seq.cancel, seq.enqueued)
}

pub(super) struct Scheduler {
    pub model: Arc<Model>,
    pub limits: BatchLimits,
    pub health: Arc<Health>,
    pub faults: Faults,
    /// The running rows' LoRA factors, stacked for gathered decode products (plain steps;
    /// a step graph holds its own).
    pub gathered: crate::model::Gathered,
    /// Whether decode steps go through step graphs (see [`BatchLimits::step_graphs`]).
    pub step_graphs: bool,
    /// A step graph per batch size class, kept while rows join and leave (rebound in place),
    /// replaced where it cannot take a batch.
    pub graphs: RefCell<Vec<StepGraph>>,
}

impl Scheduler {
    /// Runs until every stage worker has gone (the channel closes) and nothing is running.
    pub fn run(self, rx: crossbeam_channel::Receiver<Sequence>) {
        let mut active: Vec<Active> = Vec::new();
        // The head of the line: handed over, waiting for KV room.
        let mut held: Option<Sequence> = None;
        let mut kv_used = 0usize;
        let mut open = true;
        loop {
            if active.is_empty() && held.is_none() {
                if !open {
                    return;
                }
                match rx.recv() {
                    Ok(s) => held = Some(s),
                    Err(_) => return,
                }
            }
            // Admission, in arrival order.
            while active.len() < self.limits.max_running.max(1) {
                let seq = match held.take() {
                    Some(s) => s,
                    None => match rx.try_recv() {
                        Ok(s) => s,
                        Err(crossbeam_channel::TryRecvError::Empty) => break,
                        Err(crossbeam_channel::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    },
                };
                match self.admit(seq, kv_used) {
                    Admit::Run(a) => {
                        kv_used += a.kv_bytes;
                        active.push(*a);
                    }
                    Admit::Wait(s) => {
                        held = Some(*s);
                        break;
                    }
                    Admit::Refused => {}
                }
            }
            if let Some(s) = &held {
                if let Err(why) = checkpoint(s) {
                    let s = held.take().expect("held");
                    self.leave(&s, why);
                }
            }
            self.health.running.store(active.len(), Ordering::SeqCst);
            self.health.kv_bytes.store(kv_used, Ordering::SeqCst);
            if active.is_empty() {
                // Only a held sequence waits (for KV that frees as others finish): nothing
                // else runs, so it fits now unless it never will (refused at admission).
                continue;
            }
            self.iterate(&mut active);
            active.retain(|a| a.kv_bytes != 0);
            self.release_graph(&active);
            kv_used = active.iter().map(|a| a.kv_bytes).sum();
            self.health.running.store(active.len(), Ordering::SeqCst);
            self.health.kv_bytes.store(kv_used, Ordering::SeqCst);
        }
    }

    fn admit(&self, seq: Sequence, kv_used: usize) -> Admit {
        if let Err(why) = checkpoint(&seq) {
            self.leave(&seq, why);
            return Admit::Refused;
        }
        let dec = &self.model.decoder;
        let decoding = match Decoding::new(
            &seq.gen,
            seq.prompt.len(),
            dec.config().max_position_embeddings,
        ) {
            // The scheduler's answers report no log-probability (the one-sequence loop's
            // `select = confident` compares them).
            Ok(d) => d.without_logprobs(),
            Err(e) => {
                self.leave(&seq, Some(gen_error(e)));
                return Admit::Refused;
            }
        };
        let positions = seq.prompt.len() + decoding.budget();
        let need = positions * dec.kv_bytes_per_token();
        if need > self.limits.kv_cache_bytes {
            let mib = |b: usize| b as f64 / (1 << 20) as f64;
            let msg = format!(
                "the prompt ({} tokens) and max_tokens ({}) need {:.1} MiB of KV cache, over \
                 this server's budget of {:.1} MiB; lower max_tokens or shorten the prompt",
                seq.prompt.len(),
                decoding.budget(),
                mib(need),
                mib(self.limits.kv_cache_bytes)
            );
            self.leave(&seq, Some(EngineError::ContextExceeded(msg)));
            return Admit::Refused;
        }
        if kv_used + need > self.limits.kv_cache_bytes {
            return Admit::Wait(Box::new(seq));
        }
        let mut seq = seq;
        seq.completion.rag.timings_ms.queue += seq.handed_over.elapsed().as_secs_f64() * 1e3;
        Admit::Run(Box::new(Active {
            cache: dec.new_cache(positions),
            seq,
            decoding,
            prefilled: 0,
            ready: None,
            next: None,
            scores: vec![],
            kv_bytes: need,
            prefill_ms: 0.0,
            decode_from: None,
        }))
    }

    /// Answers a sequence that leaves early; a client that went away is only counted.
    fn leave(&self, seq: &Sequence, why: Leave) {
        end_early(&self.health, &seq.reply, why);
    }

    /// A panic costs the sequences whose work it interrupted: answered, logged, counted.
    fn panicked(&self, seq: &Sequence, payload: &(dyn std::any::Any + Send)) {
        answer_panic(&self.health, &seq.reply, payload, "the scheduler goes on");
    }

    /// One iteration over `active`. A sequence that leaves gets `kv_bytes = 0` (the caller
    /// drops it).
    fn iterate(&self, active: &mut [Active]) {
        // Waiting prompts may not get a chunk this iteration: free theirs at once too.
        for a in active.iter_mut() {
            if let Err(why) = checkpoint(&a.seq) {
                self.drop_active(a, why);
            }
        }
        let live = |a: &Active| a.kv_bytes != 0;
        let prefilling = |a: &Active| a.prefilled < a.seq.prompt.len();
        let decoding_rows = active.iter().filter(|a| live(a) && !prefilling(a)).count();
        let mut tokens = decoding_rows;
        for (chunks, a) in active
            .iter_mut()
            .filter(|a| live(a) && prefilling(a))
            .enumerate()
        {
            let n = self
                .limits
                .prefill_chunk
                .max(1)
                .min(a.seq.prompt.len() - a.prefilled);
            if chunks > 0 && tokens + n > self.limits.max_batch_tokens {
                break;
            }
            tokens += n;
            match catch_unwind(AssertUnwindSafe(|| self.prefill_chunk(a, n))) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => self.drop_active(a, why),
                Err(p) => {
                    self.panicked(&a.seq, p.as_ref());
                    a.kv_bytes = 0;
                }
            }
        }
        // Sample every sequence with logits; those that go on take part in the decode step.
        for a in active
            .iter_mut()
            .filter(|a| a.kv_bytes != 0 && a.ready.is_some())
        {
            match catch_unwind(AssertUnwindSafe(|| self.sample(a))) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => self.drop_active(a, why),
                Err(p) => {
                    self.panicked(&a.seq, p.as_ref());
                    a.kv_bytes = 0;
                }
            }
        }
        let mut rows: Vec<&mut Active> = active
            .iter_mut()
            .filter(|a| a.kv_bytes != 0 && a.next.is_some())
            .collect();
        if rows.is_empty() {
            return;
        }
        match catch_unwind(AssertUnwindSafe(|| self.decode_step(&mut rows))) {
            Ok(Ok(())) => {}
            // A shared step that fails or panics costs every row in it: their caches may
            // hold half a step.
            Ok(Err(e)) => {
                for a in rows {
                    let e = EngineError::Internal(e.to_string());
                    self.drop_active(a, Some(e));
                }
            }
            Err(p) => {
                // A step graph the panic interrupted may be half rebound: made again.
                self.graphs.borrow_mut().clear();
                for a in rows {
                    self.panicked(&a.seq, p.as_ref());
                    a.kv_bytes = 0;
                }
            }
        }
    }

    fn drop_active(&self, a: &mut Active, why: Leave) {
        self.leave(&a.seq, why);
        a.kv_bytes = 0;
    }

    /// Runs the next `n` prompt tokens into the cache; the last chunk yields the logits (and
    /// the continuation scores, from the same prefill).
    fn prefill_chunk(&self, a: &mut Active, n: usize) -> Result<(), Leave> {
        checkpoint(&a.seq)?;
        let t = Instant::now();
        let dec = &self.model.decoder;
        let last = a.prefilled + n == a.seq.prompt.len();
        let opts = ForwardOpts {
            logits: if last { Logits::Last } else { Logits::None },
            adapter: a.seq.adapter.as_adapter(),
            ..Default::default()
        };
        let internal = |e: candle_core::Error| Some(EngineError::Internal(e.to_string()));
        let chunk = &a.seq.prompt[a.prefilled..a.prefilled + n];
        let ids = Tensor::new(chunk, dec.device())
            .and_then(|t| t.unsqueeze(0))
            .map_err(internal)?;
        let out = dec
            .forward(&ids, Some(&mut a.cache), &opts)
            .map_err(internal)?;
        a.prefilled += n;
        if last {
            let logits = out
                .logits
                .ok_or_else(|| Some(EngineError::Internal("prefill gave no logits".into())))?
                .squeeze(0)
                .map_err(internal)?;
            if !a.seq.continuations.is_empty() {
                a.scores = score_after_prefill(
                    dec,
                    &a.cache,
                    &logits,
                    &a.seq.continuations,
                    a.seq.adapter.as_adapter(),
                )
                .map_err(internal)?;
            }
            a.ready = Some(Ready::Logits(logits));
        }
        a.prefill_ms += t.elapsed().as_secs_f64() * 1e3;
        Ok(())
    }

    /// Samples `a`'s next token and sends its text; a finished sequence is answered.
    fn sample(&self, a: &mut Active) -> Result<(), Leave> {
        checkpoint(&a.seq)?;
        if a.seq.panic_when_sampled {
            panic!("injected fault in the scheduler");
        }
        a.decode_from.get_or_insert_with(Instant::now);
        let step = match a.ready.take().expect("sampled only when ready") {
            Ready::Logits(logits) => a.decoding.step(&self.model, &logits),
            Ready::Picked(pick) => a.decoding.step_picked(&self.model, pick),
            Ready::Host(row) => a.decoding.step_sampled(&self.model, &row),
        }
        .map_err(|e| Some(gen_error(e)))?;
        let (text, next) = match step {
            Next::Token { token, text } => (text, Some(token)),
            Next::Finished { text } => (text, None),
        };
        if !text.is_empty() {
            if let Some(d) = self.faults.text_delay {
                std::thread::sleep(d);
            }
            if a.seq.reply.send(Event::Text(text)).is_err() {
                return Err(None);
            }
        }
        a.next = next;
        if next.is_none() {
            self.finish(a);
        }
        Ok(())
    }

    fn finish(&self, a: &mut Active) {
        let c = &mut a.seq.completion;
        c.text = a.decoding.text().to_string();
        c.finish_reason = a.decoding.finish_reason();
        c.completion_tokens = a.decoding.produced();
        c.choice_scores = std::mem::take(&mut a.scores);
        c.rag.timings_ms.prefill += a.prefill_ms;
        c.rag.timings_ms.decode += a
            .decode_from
            .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let _ = a.seq.reply.send(Event::Done(Box::new(c.clone())));
        a.kv_bytes = 0;
    }

    /// One token of every row through the model at once; each row gets its next logits.
    fn decode_step(&self, rows: &mut [&mut Active]) -> candle_core::Result<()> {
        let tokens: Vec<u32> = rows
            .iter_mut()
            .map(|a| a.next.take().expect("row"))
            .collect();
        let mut caches: Vec<&mut Cache> = Vec::with_capacity(rows.len());
        let mut adapters: Vec<Option<&dyn Adapter>> = Vec::with_capacity(rows.len());
        for a in rows.iter_mut() {
            let Active { cache, seq, .. } = &mut **a;
            caches.push(cache);
            adapters.push(seq.adapter.as_adapter());
        }
        let (logits, counted) = match self.step_graphs {
            true => self.graph_step(&tokens, &mut caches, &adapters)?,
            false => (
                self.plain_step(&tokens, &mut caches, adapters)?,
                GraphUse::default(),
            ),
        };
        self.health.count_step(counted);
        drop(caches);
        // The greedy rows' tokens in one op and one small copy (not a row of logits each),
        // and the sampled rows' logits in one copy to the host, where they are sampled.
        let sampled: Vec<u32> = (0..rows.len() as u32)
            .filter(|&i| !rows[i as usize].decoding.greedy())
            .collect();
        let logprobs = rows.iter().any(|a| a.decoding.logprobs());
        let picks = match sampled.len() < rows.len() {
            true => greedy_picks(&logits, logprobs)?,
            false => vec![],
        };
        let mut host = host_rows(&logits, &sampled)?.into_iter();
        for (i, a) in rows.iter_mut().enumerate() {
            a.ready = Some(match a.decoding.greedy() {
                true => Ready::Picked(picks[i]),
                false => Ready::Host(host.next().expect("a row per sampled row")),
            });
        }
        Ok(())
    }
}

/// Rows `which` of `logits` `(rows, vocab)`, as f32 on the host, in one copy.
fn host_rows(logits: &Tensor, which: &[u32]) -> candle_core::Result<Vec<Vec<f32>>> {
    if which.is_empty() {
        return Ok(vec![]);
    }
    let picked = match which.len() == logits.dim(0)? {
        true => logits.clone(),
        false => logits.index_select(&Tensor::new(which, logits.device())?, 0)?,
    };
    picked.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()
}

impl Scheduler {
    /// Lets the step graphs go of the caches of rows that left (their bytes the KV budget
    /// already counts as free); a graph that cannot is dropped.
    fn release_graph(&self, active: &[Active]) {
        let live: Vec<&Cache> = active.iter().map(|a| &a.cache).collect();
        self.graphs
            .borrow_mut()
            .retain_mut(|g| g.release(&live).is_ok());
    }

    /// A decode step with every op launched on its own (no step graph).
    fn plain_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
        adapters: Vec<Option<&dyn Adapter>>,
    ) -> candle_core::Result<Tensor> {
        let any = adapters.iter().any(Option::is_some);
        if !any {
            self.gathered.clear();
        }
        let per_row = PerRow::with_cache(adapters, &self.gathered);
        let opts = ForwardOpts {
            logits: Logits::Last,
            adapter: if any { Some(&per_row) } else { None },
            ..Default::default()
        };
        self.model.decoder.decode_step(tokens, caches, &opts)
    }

    /// A decode step through the step graph of this batch's size class (a power of two where
    /// batches are padded, see [`StepGraph::pads`]): the held one, rebound to these rows where they changed, or a
    /// new one where none is held or the held one cannot take them; a plain step where the
    /// device does not serve step graphs.
    fn graph_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
        adapters: &[Option<&dyn Adapter>],
    ) -> candle_core::Result<(Tensor, GraphUse)> {
        let dec = &self.model.decoder;
        let capacity = caches.iter().map(|c| c.capacity()).max().unwrap_or(0);
        if !dec.device_steps_serve(capacity) {
            let plain = self.plain_step(tokens, caches, adapters.to_vec())?;
            return Ok((plain, GraphUse::default()));
        }
        let slots = match self.limits.pad_steps || StepGraph::pads(dec) {
            true => caches.len().next_power_of_two(),
            false => caches.len(),
        };
        let mut graphs = self.graphs.borrow_mut();
        let at = graphs.iter().position(|g| g.slots() == slots);
        let shared: Vec<&Cache> = caches.iter().map(|c| &**c).collect();
        let (i, made) = match at {
            Some(i) if graphs[i].serves(&shared, adapters) => (i, false),
            _ => {
                // The old graph goes first: its buffers (stacks, ghosts) are freed before the
                // new one's are made.
                if let Some(i) = at {
                    graphs.remove(i);
                }
                // Admission sized each cache for its whole answer: no room to add.
                graphs.push(StepGraph::with_slots(dec, caches, 1, slots)?);
                (graphs.len() - 1, true)
            }
        };
        let replayed = graphs[i].captured();
        match graphs[i].step(dec, tokens, caches, adapters) {
            Ok((logits, rebound)) => Ok((
                logits,
                GraphUse {
                    made,
                    rebound: rebound && !made,
                    replayed,
                },
            )),
            Err(e) => {
                // The rows fail with the step; their graph goes with them.
                graphs.remove(i);
                Err(e)
            }
        }
    }
}

enum Admit {
    Run(Box<Active>),
    Wait(Box<Sequence>),
    Refused,
}

/// How long a stage worker waits on a full hand-over before it checks its request again.
pub(super) const HANDOVER_POLL: Duration = Duration::from_millis(20);
