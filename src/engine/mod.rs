//! The engine: one bounded queue feeding stage worker threads, which run a request's gate,
//! retrieval, adaptation and prompt off the async runtime and hand it to the decode
//! [`scheduler`], which generates every running request's answer in shared batched steps.
//! Events stream back over each job's own channel. A full queue refuses at once; a job whose
//! client has gone (its [`Ticket`] dropped) stops at its next check, and one past its
//! deadline answers so. A job that panics answers an internal error, and its stage worker is
//! replaced by a fresh one (the scheduler answers a panic in its work and goes on).

mod memory;
mod scheduler;
mod sequence;
mod warmup;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc;

pub use crate::params::{
    resolve_tta, ParamError, RagMode, Select, TtaOverrides, TtaParams, TtaScope,
};
pub use crate::prompt::RagPrompt;
pub use memory::MemoryBudget;
pub use scheduler::BatchLimits;
pub use warmup::{warm_up, WarmUp};

use crate::adapt::domain::{DomainAdapter, DomainAdapters};
use crate::adapt::memory::{footprint, Trained};
use crate::adapt::{adapt_full, adapt_lora, build_pairs, encode_pairs, TrainParams, TtaReport};
use crate::cancel::{Cancel, CancelOnDrop, Stopped};
use crate::gate::assess::GateReport;
use crate::gate::card::LoadedGate;
use crate::gate::features::PromptTooLong;
use crate::gate::policy::Policy;
use crate::generate::{generate_scoring, ContinuationScore, FinishReason, GenError, GenParams};
use crate::model::{Adapter, ChatMessage, Model};
use crate::retrieval::{Collections, Passage};
use memory::{Refused, Reservation};
use sequence::{SeqAdapter, Sequence};

/// Retrieval settings of one request, resolved against the config.
#[derive(Debug, Clone)]
pub struct RagParams {
    /// With `gate` set: what runs when the gate retrieves.
    pub mode: RagMode,
    pub collection: String,
    pub top_k: usize,
    /// Request mode `auto`: the gate decides under this policy whether `mode` runs at all.
    pub gate: Option<Policy>,
    /// Request mode `auto` with `mode` tta: the adaptation gate decides under this policy
    /// whether to adapt or answer static.
    pub adapt_gate: Option<Policy>,
    /// Whether the collection's domain adapter sits under the answer (and any adaptation).
    pub domain: DomainUse,
    /// Passages numbered in the prompt, the answer asked to cite them as `[n]`.
    pub cite: bool,
}

impl RagParams {
    /// `mode` on `collection` with `top_k` passages: no gate, no domain adapter, no citations.
    pub fn plain(mode: RagMode, collection: impl Into<String>, top_k: usize) -> Self {
        Self {
            mode,
            collection: collection.into(),
            top_k,
            gate: None,
            adapt_gate: None,
            domain: DomainUse::Off,
            cite: false,
        }
    }
}

/// Whether a request uses its collection's domain adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainUse {
    Off,
    /// The config's default: used when the collection has a valid one; the report says why not.
    Prefer,
    /// Asked for by the request: no valid adapter is an error.
    Require,
}

/// What answer selection did (the response's `rag.selection`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SelectionReport {
    pub rule: &'static str,
    /// `static` or `adapted`.
    pub chosen: &'static str,
    pub static_logprob: f64,
    pub adapted_logprob: f64,
    pub same_answer: bool,
}

/// What the domain adapter did for a request (the response's `rag.domain_adapter`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DomainReport {
    pub used: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter_sha256: Option<String>,
    /// Why it was not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a request answers with after adaptation.
enum Adapted {
    Base,
    Lora(crate::adapt::Lora),
    Full(crate::model::Decoder),
}

/// One validated chat request, independent of the wire format.
#[derive(Debug, Clone)]
pub struct ChatJob {
    pub messages: Vec<ChatMessage>,
    pub gen: GenParams,
    pub rag: RagParams,
    /// Set when `rag.mode` is `tta`.
    pub tta: Option<TtaParams>,
}

/// Per-stage wall time in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Timings {
    pub queue: f64,
    /// The gate's forward pass and probe (mode `auto`).
    #[serde(default)]
    pub gate: f64,
    pub retrieve: f64,
    pub adapt: f64,
    pub prefill: f64,
    pub decode: f64,
}

/// What retrieval did for a request (the response's `rag` extension).
#[derive(Debug, Clone, Serialize)]
pub struct RagReport {
    /// The mode that ran: `none` when the gate skipped retrieval.
    pub mode: RagMode,
    pub collection: Option<String>,
    pub passages: Vec<Passage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tta: Option<TtaReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateReport>,
    /// The adaptation gate's verdict: mode `static` when it skipped adaptation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapt_gate: Option<GateReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain_adapter: Option<DomainReport>,
    /// How `rag.tta.select` chose between the static and the adapted answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selection: Option<SelectionReport>,
    pub timings_ms: Timings,
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub rag: RagReport,
    /// One score per choice given to [`Engine::submit_scored`], in order; empty otherwise.
    pub choice_scores: Vec<ContinuationScore>,
}

/// Errors a request can end with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("server is overloaded: {0} requests already queued; retry later")]
    Overloaded(usize),
    /// A shared resource the request needs is taken (one full-scope adaptation at a time).
    #[error("{0}")]
    Busy(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("{0}")]
    ContextExceeded(String),
    /// The request cannot be served as written (e.g. the chat template refuses it).
    #[error("{0}")]
    Invalid(String),
    /// A request parameter names something this server cannot serve (e.g. a domain adapter
    /// the collection lacks).
    #[error("{message}")]
    BadParam {
        param: &'static str,
        code: &'static str,
        message: String,
    },
    #[error("the request did not finish within its deadline of {0} ms (queue wait included)")]
    DeadlineExceeded(u64),
    /// The job panicked; the cause is logged, not sent to the client.
    #[error("internal error while processing the request")]
    Panicked,
    #[error("{0}")]
    Internal(String),
}

/// What a job sends back while it runs.
#[derive(Debug)]
pub enum Event {
    /// A piece of answer text.
    Text(String),
    Done(Box<Completion>),
    Error(EngineError),
}

struct Job {
    req: ChatJob,
    /// Answer choices to rank by likelihood under the request's own (adapted) model, after
    /// its answer (the offline evaluation's multiple-choice questions).
    choices: Vec<String>,
    reply: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
    cancel: Cancel,
    slot: Arc<Slot>,
}

/// A job's place among the `queue_capacity` waiting ones, given back exactly once: by the
/// worker that takes the job, or by its ticket dropped while it still waits, so a request
/// whose client left stops counting against the queue at once (not when a worker reaches it).
struct Slot {
    held: std::sync::atomic::AtomicBool,
    queued: Arc<AtomicUsize>,
}

impl Slot {
    fn release(&self) {
        if self.held.swap(false, Ordering::SeqCst) {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Abandoned jobs stay in the channel until a worker skips them; this many queue capacities
/// of them at most, so hung-up requests cannot pile up memory behind long-running work.
const CHANNEL_SLACK: usize = 4;

/// A submitted job's events. Dropping it cancels the job (the client went away).
pub struct Ticket {
    events: mpsc::UnboundedReceiver<Event>,
    _cancel: CancelOnDrop,
    slot: Arc<Slot>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.slot.release();
    }
}

impl std::ops::Deref for Ticket {
    type Target = mpsc::UnboundedReceiver<Event>;
    fn deref(&self) -> &Self::Target {
        &self.events
    }
}

impl std::ops::DerefMut for Ticket {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.events
    }
}

/// Liveness of the worker pool, for `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct Health {
    /// Worker threads running now (a replaced worker's successor is counted before it exits).
    alive: AtomicUsize,
    /// Jobs that panicked since start.
    panics: AtomicU64,
    /// Jobs that stopped because their client went away.
    cancelled: AtomicU64,
    /// Whether the decode scheduler's thread runs.
    scheduler_alive: std::sync::atomic::AtomicBool,
    /// Sequences the scheduler has admitted (prefilling or decoding).
    running: AtomicUsize,
    /// Bytes their KV caches reserve.
    kv_bytes: AtomicUsize,
    /// Decode steps the scheduler ran, step graphs it made (one per batch composition) and
    /// steps that replayed a captured graph: how often the rows change under load, and what
    /// that costs in captures.
    decode_steps: AtomicU64,
    step_graphs: AtomicU64,
    rebound_steps: AtomicU64,
    replayed_steps: AtomicU64,
}

/// What one decode step did with step graphs.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GraphUse {
    /// It made a step graph.
    pub made: bool,
    /// It rebound the held step graph to other rows (one joined or left).
    pub rebound: bool,
    /// It replayed a captured graph.
    pub replayed: bool,
}

/// The scheduler's decode steps so far (see [`Health::decode_counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    /// Decode steps run (each one token of every row of a batch).
    pub steps: u64,
    /// Step graphs made: one per batch size class, and again where the held one could not
    /// take a batch.
    pub graphs: u64,
    /// Steps that rebound the held step graph to other rows (a row joined or left) instead of
    /// making one.
    pub rebound: u64,
    /// Steps that replayed a captured graph (one launch), not their ops one by one.
    pub replayed: u64,
}

impl DecodeCounts {
    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            steps: self.steps - earlier.steps,
            graphs: self.graphs - earlier.graphs,
            rebound: self.rebound - earlier.rebound,
            replayed: self.replayed - earlier.replayed,
        }
    }
}

impl Health {
    pub fn workers_alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn panics(&self) -> u64 {
        self.panics.load(Ordering::SeqCst)
    }

    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }

    pub fn scheduler_alive(&self) -> bool {
        self.scheduler_alive.load(Ordering::SeqCst)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub fn kv_bytes(&self) -> usize {
        self.kv_bytes.load(Ordering::SeqCst)
    }

    pub fn decode_counts(&self) -> DecodeCounts {
        DecodeCounts {
            steps: self.decode_steps.load(Ordering::SeqCst),
            graphs: self.step_graphs.load(Ordering::SeqCst),
            rebound: self.rebound_steps.load(Ordering::SeqCst),
            replayed: self.replayed_steps.load(Ordering::SeqCst),
        }
    }

    /// Counts a decode step and what it did with step graphs.
    fn count_step(&self, used: GraphUse) {
        self.decode_steps.fetch_add(1, Ordering::SeqCst);
        let add = |c: &AtomicU64, yes: bool| c.fetch_add(u64::from(yes), Ordering::SeqCst);
        add(&self.step_graphs, used.made);
        add(&self.rebound_steps, used.rebound);
        add(&self.replayed_steps, used.replayed);
    }
}

/// Counts one running worker thread for as long as it lives, however it ends.
struct Alive(Arc<Health>);

impl Alive {
    fn new(h: &Arc<Health>) -> Self {
        h.alive.fetch_add(1, Ordering::SeqCst);
        Self(h.clone())
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Clonable handle to the engine; dropping the last one stops the workers.
#[derive(Clone)]
pub struct Engine {
    tx: crossbeam_channel::Sender<Job>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    workers: usize,
    timeout: Option<Duration>,
    max_prompt_tokens: usize,
    health: Arc<Health>,
    adapt_memory: Arc<MemoryBudget>,
    pub model: Arc<Model>,
    pub collections: Arc<Collections>,
}

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub workers: usize,
    pub queue_capacity: usize,
    pub prompt_template: String,
    /// Collections' own prompt templates, by name (`[collections.NAME] prompt_template`).
    pub collection_templates: Vec<(String, String)>,
    /// The retrieval gate for requests in mode `auto`; such requests fail without one.
    pub gate: Option<Arc<LoadedGate>>,
    /// The adaptation gate for `auto` requests that would adapt.
    pub adapt_gate: Option<Arc<LoadedGate>>,
    /// Deadline of a job from its submission, queue wait included; `None` = none.
    pub request_timeout: Option<Duration>,
    /// Longest prompt (passages included) a job may run, in tokens; 0 = the model's context.
    pub max_prompt_tokens: usize,
    /// Each collection's domain adapter, for requests that use it.
    pub domain: Option<Arc<DomainAdapters>>,
    /// What the decode scheduler runs at once.
    pub batch: BatchLimits,
    /// Fault injection for tests; the CLI never sets it.
    pub faults: Faults,
}

/// Faults a test can inject into the workers.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// A job whose last user message is exactly this text panics inside rayon's thread pool.
    pub panic_on: Option<String>,
    /// A pause after each piece of answer text: jobs long enough to hang up on or time out.
    pub text_delay: Option<Duration>,
    /// A job whose last user message is exactly this text panics in the decode scheduler,
    /// while other requests' answers run beside it.
    pub panic_in_decode: Option<String>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            workers: 1,
            queue_capacity: 1,
            prompt_template: crate::config::Config::default().retrieval.prompt_template,
            collection_templates: vec![],
            gate: None,
            adapt_gate: None,
            request_timeout: None,
            max_prompt_tokens: 0,
            domain: None,
            batch: BatchLimits::default(),
            faults: Faults::default(),
        }
    }
}

struct Worker {
    model: Arc<Model>,
    collections: Arc<Collections>,
    prompt: Arc<RagPrompt>,
    health: Arc<Health>,
    /// Taken while a full-weight adaptation and its answer run: one private weight copy at a
    /// time. A second such request is refused at once rather than left to block its worker.
    full_scope: Arc<std::sync::Mutex<()>>,
    domain: Option<Arc<DomainAdapters>>,
    gate: Option<Arc<LoadedGate>>,
    adapt_gate: Option<Arc<LoadedGate>>,
    max_prompt_tokens: usize,
    prefill_chunk: usize,
    /// Whether answers generated here (full scope, `select = confident`) decode through step
    /// graphs, as the scheduler's do.
    step_graphs: bool,
    faults: Faults,
    /// To the decode scheduler; a full scheduler holds the stage workers back.
    handover: crossbeam_channel::Sender<Sequence>,
    /// What adaptations in flight hold (working sets while training, adapters after).
    adapt_memory: Arc<MemoryBudget>,
}

/// Runs a gate on the request's prompt; a prompt over the model's context is the client's 400.
fn assess(
    g: &LoadedGate,
    model: &Model,
    req: &ChatJob,
    with_passages: Option<&[ChatMessage]>,
    policy: Policy,
) -> Result<GateReport, Option<EngineError>> {
    g.assess(model, &req.messages, with_passages, policy)
        .map_err(|e| match e.downcast_ref::<PromptTooLong>() {
            Some(t) => Some(EngineError::ContextExceeded(t.to_string())),
            None => Some(EngineError::Internal(format!("{e:#}"))),
        })
}

/// Answers a request that ends without a completion: an error is logged and sent; a client
/// that went away (`None`) is only counted.
fn end_early(health: &Health, reply: &mpsc::UnboundedSender<Event>, why: Option<EngineError>) {
    match why {
        Some(e) => {
            tracing::warn!(error = %e, "request failed");
            let _ = reply.send(Event::Error(e));
        }
        None => {
            health.cancelled.fetch_add(1, Ordering::SeqCst);
            tracing::debug!("client went away; request cancelled");
        }
    }
}

/// Answers a request whose work panicked (500), logging the cause and counting it; `then`
/// says what happens next.
fn answer_panic(
    health: &Health,
    reply: &mpsc::UnboundedSender<Event>,
    payload: &(dyn std::any::Any + Send),
    then: &str,
) {
    let cause = panic_cause(payload);
    health.panics.fetch_add(1, Ordering::SeqCst);
    tracing::error!(%cause, "request panicked; {then}");
    let _ = reply.send(Event::Error(EngineError::Panicked));
}

/// The text of a panic's payload.
fn panic_cause(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

/// Starts worker thread `id`. A job that panics is answered, logged and counted, and the
/// thread hands its place to a fresh one: nothing of the failed job's stack is reused.
fn spawn_worker(
    id: usize,
    rx: crossbeam_channel::Receiver<Job>,
    w: Arc<Worker>,
) -> std::io::Result<()> {
    let alive = Alive::new(&w.health);
    std::thread::Builder::new()
        .name(format!("model-worker-{id}"))
        .spawn(move || {
            let _alive = alive;
            while let Ok(job) = rx.recv() {
                job.slot.release();
                let reply = job.reply.clone();
                let Err(payload) = catch_unwind(AssertUnwindSafe(|| w.run(job))) else {
                    continue;
                };
                let then = format!("stage worker {id} is replaced");
                answer_panic(&w.health, &reply, payload.as_ref(), &then);
                if let Err(e) = spawn_worker(id, rx.clone(), w.clone()) {
                    tracing::error!(worker = id, error = %e, "could not start a replacement worker");
                }
                return;
            }
        })?;
    Ok(())
}

impl Engine {
    pub fn start(
        model: Arc<Model>,
        collections: Arc<Collections>,
        cfg: &EngineConfig,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.queue_capacity * CHANNEL_SLACK);
        let queued = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(Health::default());
        // A rendezvous: a stage worker's hand-over completes when the scheduler takes the
        // sequence in, so nothing waits unseen between the queue and the batch.
        let (handover, sequences) = crossbeam_channel::bounded::<Sequence>(0);
        let adapt_memory = MemoryBudget::new(cfg.batch.adapt_memory_bytes);
        let scheduler = scheduler::Scheduler {
            model: model.clone(),
            limits: cfg.batch.clone(),
            health: health.clone(),
            faults: cfg.faults.clone(),
            gathered: Default::default(),
            step_graphs: cfg.batch.step_graphs || model.decoder.replays_steps(),
            graphs: Default::default(),
        };
        health.scheduler_alive.store(true, Ordering::SeqCst);
        let alive = health.clone();
        std::thread::Builder::new()
            .name("decode-scheduler".into())
            .spawn(move || {
                // Its own panics are caught per sequence; this only marks an exit, however
                // it comes.
                struct Exit(Arc<Health>);
                impl Drop for Exit {
                    fn drop(&mut self) {
                        self.0.scheduler_alive.store(false, Ordering::SeqCst);
                    }
                }
                let _exit = Exit(alive);
                scheduler.run(sequences);
            })?;
        let w = Arc::new(Worker {
            model: model.clone(),
            collections: collections.clone(),
            prompt: Arc::new(
                cfg.collection_templates
                    .iter()
                    .try_fold(RagPrompt::new(&cfg.prompt_template)?, |p, (n, t)| {
                        p.with_collection(n, t)
                    })?,
            ),
            health: health.clone(),
            full_scope: Arc::new(std::sync::Mutex::new(())),
            domain: cfg.domain.clone(),
            gate: cfg.gate.clone(),
            adapt_gate: cfg.adapt_gate.clone(),
            max_prompt_tokens: cfg.max_prompt_tokens,
            prefill_chunk: cfg.batch.prefill_chunk.max(1),
            step_graphs: cfg.batch.step_graphs || model.decoder.replays_steps(),
            faults: cfg.faults.clone(),
            handover,
            adapt_memory: adapt_memory.clone(),
        });
        let workers = cfg.workers.max(1);
        for i in 0..workers {
            spawn_worker(i, rx.clone(), w.clone())?;
        }
        Ok(Self {
            tx,
            queued,
            capacity: cfg.queue_capacity,
            workers,
            timeout: cfg.request_timeout,
            max_prompt_tokens: cfg.max_prompt_tokens,
            health,
            adapt_memory,
            model,
            collections,
        })
    }

    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The adaptation memory budget: its limit and what is reserved now.
    pub fn adapt_memory(&self) -> &Arc<MemoryBudget> {
        &self.adapt_memory
    }

    /// Worker threads configured.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Tokens of the conversation as the model would read it without passages: what can be
    /// checked before a job is accepted.
    pub fn conversation_tokens(&self, messages: &[ChatMessage]) -> Result<usize, EngineError> {
        self.model
            .encode_chat(messages)
            .map(|t| t.ids.len())
            .map_err(|e| match e {
                crate::model::ModelError::Template(m) => EngineError::Invalid(m),
                e => EngineError::Internal(e.to_string()),
            })
    }

    /// The longest prompt a job may run, in tokens.
    pub fn prompt_limit(&self) -> usize {
        prompt_limit(&self.model, self.max_prompt_tokens)
    }

    /// Requests waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Queues a request; fails at once when the queue is full. The job's deadline (queue wait
    /// included) starts now.
    pub fn submit(&self, req: ChatJob) -> Result<Ticket, EngineError> {
        self.enqueue(req, vec![])
    }

    /// [`submit`](Self::submit) that also scores each of `choices` as a continuation of the
    /// prompt under the model the answer came from, adaptation included, into
    /// [`Completion::choice_scores`]: how the offline evaluation ranks fixed answer choices.
    #[cfg(feature = "lab")]
    pub fn submit_scored(&self, req: ChatJob, choices: Vec<String>) -> Result<Ticket, EngineError> {
        self.enqueue(req, choices)
    }

    fn enqueue(&self, req: ChatJob, choices: Vec<String>) -> Result<Ticket, EngineError> {
        let (reply, rx) = mpsc::unbounded_channel();
        let enqueued = Instant::now();
        let cancel = Cancel::new(self.timeout.map(|t| enqueued + t));
        let cap = self.capacity;
        if self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_err()
        {
            return Err(EngineError::Overloaded(cap));
        }
        let slot = Arc::new(Slot {
            held: true.into(),
            queued: self.queued.clone(),
        });
        let ticket = Ticket {
            events: rx,
            _cancel: cancel.on_drop(),
            slot: slot.clone(),
        };
        let job = Job {
            req,
            choices,
            reply,
            enqueued,
            cancel,
            slot,
        };
        match self.tx.try_send(job) {
            Ok(()) => Ok(ticket),
            Err(e) => {
                // The ticket's drop gives the place back.
                Err(match e {
                    crossbeam_channel::TrySendError::Full(_) => {
                        EngineError::Overloaded(self.capacity)
                    }
                    crossbeam_channel::TrySendError::Disconnected(_) => EngineError::Stopped,
                })
            }
        }
    }
}

/// The longest prompt a job may run: the configured bound, never past the model's context.
fn prompt_limit(model: &Model, configured: usize) -> usize {
    let context = model
        .decoder
        .config()
        .max_position_embeddings
        .saturating_sub(1);
    match configured {
        0 => context,
        n => n.min(context),
    }
}

/// Whether a request may go on: `Err(None)` when its client went away (its event channel
/// closed or its ticket dropped), an error once past its deadline (counted from `enqueued`).
fn may_go_on(
    reply: &mpsc::UnboundedSender<Event>,
    cancel: &Cancel,
    enqueued: Instant,
) -> Result<(), Option<EngineError>> {
    if reply.is_closed() {
        return Err(None);
    }
    match cancel.check() {
        Ok(()) => Ok(()),
        Err(Stopped::Cancelled) => Err(None),
        Err(Stopped::DeadlineExceeded) => Err(Some(EngineError::DeadlineExceeded(
            cancel
                .deadline()
                .map_or(0, |d| d.duration_since(enqueued).as_millis() as u64),
        ))),
    }
}

fn checkpoint(job: &Job) -> Result<(), Option<EngineError>> {
    may_go_on(&job.reply, &job.cancel, job.enqueued)
}

impl Worker {
    fn run(&self, job: Job) {
        let span = tracing::info_span!("request", mode = ?job.req.rag.mode);
        let _g = span.enter();
        let queue_ms = job.enqueued.elapsed().as_secs_f64() * 1e3;
        match checkpoint(&job).and_then(|()| self.process(&job, queue_ms)) {
            Ok(Some(c)) => {
                let _ = job.reply.send(Event::Done(Box::new(c)));
            }
            // The scheduler answers it.
            Ok(None) => {}
            Err(why) => end_early(&self.health, &job.reply, why),
        }
    }

    /// Fault injection (see [`Faults::panic_on`]): panics inside rayon's pool, where candle's
    /// CPU kernels run, so tests see that the pool outlives a panicking job.
    fn maybe_panic(&self, req: &ChatJob) {
        let Some(marker) = &self.faults.panic_on else {
            return;
        };
        if crate::model::question(&req.messages) == Some(marker.as_str()) {
            use rayon::prelude::*;
            (0..4).into_par_iter().for_each(|i| {
                if i == 3 {
                    panic!("injected fault");
                }
            });
        }
    }

    /// Trains this request's adapter on prefix/suffix pairs cut from the passages.
    /// Adapts within the adaptation memory budget: reserves the estimated working set first
    /// (waiting while others hold too much), and returns what the result keeps reserved.
    #[allow(clippy::type_complexity)]
    fn adapt(
        &self,
        job: &Job,
        params: &TtaParams,
        passages: &[Passage],
        under: Option<&dyn Adapter>,
    ) -> Result<(Adapted, TtaReport, Option<Reservation>), Option<EngineError>> {
        let req = &job.req;
        let texts: Vec<&str> = passages.iter().map(|p| p.text.as_str()).collect();
        let set = build_pairs(&texts, &params.pairs);
        let query = if params.train.condition_on_query {
            crate::model::question(&req.messages)
        } else {
            None
        };
        let examples = encode_pairs(
            &self.model,
            &set.pairs,
            query,
            params.train.max_tokens_per_pair,
        )
        .map_err(|e| Some(EngineError::Internal(e.to_string())))?;
        let dec = &self.model.decoder;
        let trained = match params.scope {
            TtaScope::Lora => Trained::Lora(&params.train.lora),
            TtaScope::Full => Trained::Full,
        };
        let need = footprint(dec, trained, &examples, &params.train);
        let mut memory = self
            .adapt_memory
            .reserve(need.working, || checkpoint(job))
            .map_err(|r| match r {
                Refused::Stopped(why) => why,
                Refused::TooLarge { need, limit } => Some(EngineError::BadParam {
                    param: "rag.tta",
                    code: "adaptation_too_large",
                    message: format!(
                        "this adaptation needs ~{} MiB of working memory, over this server's \
                         server.adapt_memory_mb of {}; use fewer or shorter pairs \
                         (rag.tta.max_pairs), a lower rag.tta.lora_rank, or scope `lora`",
                        need.div_ceil(1 << 20),
                        limit >> 20
                    ),
                }),
            })?;
        let span = tracing::info_span!("adapt", pairs = examples.len(), reserved = need.working);
        let _g = span.enter();
        let train = TrainParams {
            cancel: job.cancel.clone(),
            ..params.train.clone()
        };
        let trained = match params.scope {
            TtaScope::Lora => adapt_lora(dec, under, &examples, set.source, &train)
                .map(|(l, r)| (l.map_or(Adapted::Base, Adapted::Lora), r)),
            TtaScope::Full => adapt_full(dec, &examples, set.source, &train)
                .map(|(d, r)| (d.map_or(Adapted::Base, Adapted::Full), r)),
        };
        let (adapted, report) = trained.map_err(|e| match checkpoint(job) {
            // The step check stopped it: report why, not the wrapped error.
            Err(stop) => stop,
            Ok(()) => Some(EngineError::Internal(e.to_string())),
        })?;
        // From here on the request holds only what its answer reads.
        let keep = match &adapted {
            Adapted::Base => 0,
            Adapted::Lora(l) => l.bytes(),
            Adapted::Full(_) => need.resident,
        };
        memory.shrink_to(keep);
        Ok((adapted, report, (keep > 0).then_some(memory)))
    }

    /// The domain adapter a request on `collection` answers with, and what to report of it.
    /// `Require` without a valid adapter is a 400; `Prefer` then answers without one.
    #[allow(clippy::type_complexity)]
    fn domain_adapter(
        &self,
        collection: &str,
        want: DomainUse,
        full: bool,
    ) -> Result<(Option<Arc<DomainAdapter>>, Option<DomainReport>), Option<EngineError>> {
        let found = match &self.domain {
            None => Err("this server has no domain adapters configured".to_string()),
            Some(store) => self
                .collections
                .get(collection)
                .and_then(|c| c.fingerprint())
                .map_err(|e| e.to_string())
                .and_then(|fp| store.get(collection, &fp))
                .and_then(|a| a.ok_or_else(|| format!("collection `{collection}` has no domain adapter (train one with `ttarag index adapt --collection {collection}`)"))),
        };
        // Scope full trains its own copy of every weight; a delta beneath it is not supported.
        let found = found.and_then(|a| match full {
            true => Err("scope `full` does not stack on a domain adapter; send \"domain_adapter\": false or scope `lora`".into()),
            false => Ok(a),
        });
        match (found, want) {
            (Ok(a), _) => {
                let report = DomainReport {
                    used: true,
                    adapter_sha256: Some(a.card.adapter_sha256.clone()),
                    reason: None,
                };
                Ok((Some(a), Some(report)))
            }
            (Err(why), DomainUse::Require) => Err(Some(EngineError::BadParam {
                param: "rag.domain_adapter",
                code: "domain_adapter_unavailable",
                message: format!("rag.domain_adapter: {why}"),
            })),
            (Err(why), _) => Ok((
                None,
                Some(DomainReport {
                    used: false,
                    adapter_sha256: None,
                    reason: Some(why),
                }),
            )),
        }
    }

    /// Runs the stages before generation and hands the request to the scheduler (`None`), or
    /// answers it here when its answer cannot join a batch (a full-scope copy of the weights,
    /// or two answers to choose from). `Err(None)` means the client went away.
    fn process(&self, job: &Job, queue_ms: f64) -> Result<Option<Completion>, Option<EngineError>> {
        let (req, reply) = (&job.req, &job.reply);
        self.maybe_panic(req);
        let internal = |e: String| Some(EngineError::Internal(e));
        let mut timings = Timings {
            queue: queue_ms,
            ..Default::default()
        };

        // Adaptation may learn from more passages than the prompt shows: retrieve them all
        // at once, the prompt's first.
        let search_k = match (&req.tta, req.rag.mode) {
            (Some(p), RagMode::Tta) => req.rag.top_k.max(p.adapt_top_k),
            _ => req.rag.top_k,
        };
        let retrieve = |timings: &mut Timings| {
            checkpoint(job)?;
            let t = Instant::now();
            let question = crate::model::question(&req.messages).unwrap_or("");
            let coll = self
                .collections
                .get(&req.rag.collection)
                .map_err(|e| match e {
                    // Deleted since the request was validated.
                    crate::retrieval::RetrievalError::UnknownCollection(_) => {
                        Some(EngineError::BadParam {
                            param: "rag.collection",
                            code: "collection_not_found",
                            message: e.to_string(),
                        })
                    }
                    e => internal(e.to_string()),
                })?;
            let hits = coll
                .search(question, search_k)
                .map_err(|e| internal(e.to_string()))?;
            timings.retrieve += t.elapsed().as_secs_f64() * 1e3;
            Ok::<_, Option<EngineError>>(hits)
        };

        let mut mode = req.rag.mode;
        // A post-pass gate reads the prompt with passages, so retrieval comes first.
        let mut retrieved = None;
        let gate = match req.rag.gate {
            None => None,
            Some(policy) => {
                let g = self.gate.as_ref().ok_or_else(|| {
                    Some(EngineError::Internal(
                        "mode `auto` needs a gate probe and this engine has none".into(),
                    ))
                })?;
                let with_passages = if g.needs_passages() && mode != RagMode::None {
                    let hits = retrieve(&mut timings)?;
                    let shown = &hits[..hits.len().min(req.rag.top_k)];
                    let m = self
                        .prompt
                        .apply_for(&req.rag.collection, req.rag.cite, &req.messages, shown)
                        .map_err(|e| internal(e.to_string()))?;
                    retrieved = Some(hits);
                    Some(m)
                } else {
                    None
                };
                checkpoint(job)?;
                let report = assess(g, &self.model, req, with_passages.as_deref(), policy)?;
                timings.gate = report.gate_ms;
                if !report.decision.retrieves() {
                    mode = RagMode::None;
                }
                Some(report)
            }
        };

        let (collection, mut passages) = match mode {
            RagMode::None => (None, vec![]),
            RagMode::Static | RagMode::Tta => {
                let hits = match retrieved {
                    Some(h) => h,
                    None => retrieve(&mut timings)?,
                };
                (Some(req.rag.collection.clone()), hits)
            }
        };
        // The prompt's passages; the rest (if any) only feed adaptation.
        let extra = passages.split_off(passages.len().min(req.rag.top_k));

        // The adaptation gate: adapt, or answer static from the same passages.
        let adapt_gate = match (mode, req.rag.adapt_gate) {
            (RagMode::Tta, Some(policy)) => {
                let g = self.adapt_gate.as_ref().ok_or_else(|| {
                    internal(
                        "rag.gate.adapt needs an adaptation gate and this engine has none".into(),
                    )
                })?;
                let with_passages = match g.needs_passages() {
                    true => Some(
                        self.prompt
                            .apply_for(&req.rag.collection, req.rag.cite, &req.messages, &passages)
                            .map_err(|e| internal(e.to_string()))?,
                    ),
                    false => None,
                };
                checkpoint(job)?;
                let report = assess(g, &self.model, req, with_passages.as_deref(), policy)?;
                timings.gate += report.gate_ms;
                if !report.decision.retrieves() {
                    mode = RagMode::Static;
                }
                Some(report)
            }
            _ => None,
        };

        let full = matches!(&req.tta, Some(p) if p.scope == TtaScope::Full) && mode == RagMode::Tta;
        let (domain, domain_report) = match (mode, req.rag.domain) {
            (RagMode::None, _) | (_, DomainUse::Off) => (None, None),
            (_, want) => self.domain_adapter(&req.rag.collection, want, full)?,
        };
        // A poisoned lock only means another request panicked; the guard protects no data.
        let _serial = match full {
            false => None,
            true => match self.full_scope.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {
                    return Err(Some(EngineError::Busy(
                        "another full-scope adaptation is running (one at a time); retry later \
                         or use scope `lora`"
                            .into(),
                    )))
                }
            },
        };
        checkpoint(job)?;
        let (adapted, tta, memory) = match (&req.tta, mode) {
            (Some(params), RagMode::Tta) => {
                let under = domain.as_ref().map(|d| &d.lora as &dyn Adapter);
                let pool: Vec<Passage> = passages.iter().chain(&extra).cloned().collect();
                let (adapted, mut report, memory) = self.adapt(job, params, &pool, under)?;
                timings.adapt = report.adapt_ms;
                report.adapt_passages = pool.len();
                (adapted, Some(report), memory)
            }
            _ => (Adapted::Base, None, None),
        };

        let messages = self
            .prompt
            .apply_for(&req.rag.collection, req.rag.cite, &req.messages, &passages)
            .map_err(|e| internal(e.to_string()))?;
        // Contents are plain text: only the template writes control tokens.
        let ids = self
            .model
            .encode_chat(&messages)
            .map_err(|e| internal(e.to_string()))?
            .ids;
        let conts = job
            .choices
            .iter()
            .map(|c| self.model.tokenizer.encode_text(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| internal(e.to_string()))?;
        let limit = prompt_limit(&self.model, self.max_prompt_tokens);
        if ids.len() > limit {
            return Err(Some(EngineError::ContextExceeded(format!(
                "the prompt with its passages is {} tokens, over this server's limit of {limit}",
                ids.len()
            ))));
        }
        checkpoint(job)?;
        let mut completion = Completion {
            text: String::new(),
            finish_reason: FinishReason::Length,
            prompt_tokens: ids.len(),
            completion_tokens: 0,
            rag: RagReport {
                mode,
                collection,
                passages,
                tta,
                gate,
                adapt_gate,
                domain_adapter: domain_report,
                selection: None,
                timings_ms: timings,
            },
            choice_scores: vec![],
        };
        let select = req.tta.as_ref().map_or(Select::Adapted, |p| p.select);
        let adapted = match (adapted, select) {
            (Adapted::Full(d), _) => Adapted::Full(d),
            (a @ Adapted::Lora(_), Select::Confident) => a,
            // Everything else joins the batch.
            (a, _) => {
                let adapter = match (a, domain) {
                    (Adapted::Lora(l), Some(d)) => SeqAdapter::OwnOverDomain(l, d),
                    (Adapted::Lora(l), None) => SeqAdapter::Own(l),
                    (_, Some(d)) => SeqAdapter::Domain(d),
                    (_, None) => SeqAdapter::Base,
                };
                let seq = Sequence {
                    prompt: ids,
                    gen: req.gen.clone(),
                    adapter,
                    continuations: conts,
                    reply: reply.clone(),
                    cancel: job.cancel.clone(),
                    enqueued: job.enqueued,
                    handed_over: Instant::now(),
                    completion,
                    panic_when_sampled: self.faults.panic_in_decode.as_deref()
                        == crate::model::question(&req.messages),
                    memory,
                };
                self.hand_over(job, seq)?;
                return Ok(None);
            }
        };

        // Answered here, apart from the batch; the adaptation's reservation (`memory`) is
        // held until this function returns.
        let mut on_text = |t: &str| {
            if let Some(d) = self.faults.text_delay {
                std::thread::sleep(d);
            }
            reply.send(Event::Text(t.to_string())).is_ok()
        };
        let stack;
        let under = domain.as_ref().map(|d| &d.lora as &dyn Adapter);
        let (dec, adapter): (&crate::model::Decoder, Option<&dyn Adapter>) = match &adapted {
            Adapted::Base => (&self.model.decoder, under),
            Adapted::Lora(l) => match under {
                Some(under) => {
                    stack = crate::adapt::Stack { under, over: l };
                    (&self.model.decoder, Some(&stack))
                }
                None => (&self.model.decoder, Some(l)),
            },
            Adapted::Full(d) => (d, None),
        };
        let run = |dec, adapter, on_text: &mut dyn FnMut(&str) -> bool| {
            let gen = generate_scoring(
                &self.model,
                dec,
                &ids,
                &req.gen,
                adapter,
                &conts,
                crate::generate::Passes {
                    chunk: self.prefill_chunk,
                    step_graphs: self.step_graphs,
                },
                &job.cancel,
                on_text,
            );
            match gen {
                Ok(o) => Ok(o),
                Err(GenError::Cancelled) => Err(None),
                Err(GenError::Stopped(_)) => Err(checkpoint(job).err().flatten()),
                Err(e @ GenError::ContextExceeded { .. }) => {
                    Err(Some(EngineError::ContextExceeded(e.to_string())))
                }
                Err(e) => Err(internal(e.to_string())),
            }
        };
        let timings = &mut completion.rag.timings_ms;
        let (out, choice_scores, selection) = match (&adapted, select) {
            (Adapted::Base, _) | (_, Select::Adapted) => {
                let (out, scores) = run(dec, adapter, &mut on_text)?;
                (out, scores, None)
            }
            // Both answers in full before either is shown: the more confident one is sent.
            (_, Select::Confident) => {
                let (fixed, fixed_scores) = run(&self.model.decoder, under, &mut |_| true)?;
                let (moved, moved_scores) = run(dec, adapter, &mut |_| true)?;
                let report = SelectionReport {
                    rule: "confident",
                    chosen: if moved.mean_logprob() >= fixed.mean_logprob() {
                        "adapted"
                    } else {
                        "static"
                    },
                    static_logprob: fixed.mean_logprob(),
                    adapted_logprob: moved.mean_logprob(),
                    same_answer: fixed.text == moved.text,
                };
                timings.prefill += fixed.prefill_ms;
                timings.decode += fixed.decode_ms;
                let (out, scores) = match report.chosen {
                    "adapted" => (moved, moved_scores),
                    _ => (fixed, fixed_scores),
                };
                if !on_text(&out.text) {
                    return Err(None);
                }
                (out, scores, Some(report))
            }
        };
        timings.prefill += out.prefill_ms;
        timings.decode += out.decode_ms;
        completion.text = out.text;
        completion.finish_reason = out.finish_reason;
        completion.completion_tokens = out.completion_tokens;
        completion.rag.selection = selection;
        completion.choice_scores = choice_scores;
        Ok(Some(completion))
    }

    /// Hands `seq` to the scheduler, waiting while it is full (and checking the request
    /// meanwhile: a client that leaves or a deadline that passes ends the wait).
    fn hand_over(&self, job: &Job, mut seq: Sequence) -> Result<(), Option<EngineError>> {
        // On a GPU each thread queues on its own stream: what this worker wrote (the adapter)
        // must be done before the scheduler's stream reads it. A no-op on the CPU.
        self.model
            .decoder
            .device()
            .synchronize()
            .map_err(|e| Some(EngineError::Internal(e.to_string())))?;
        loop {
            checkpoint(job)?;
            match self.handover.send_timeout(seq, scheduler::HANDOVER_POLL) {
                Ok(()) => return Ok(()),
                Err(crossbeam_channel::SendTimeoutError::Timeout(s)) => seq = s,
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => {
                    return Err(Some(EngineError::Stopped))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
