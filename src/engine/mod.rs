//! The engine: one bounded queue feeding model worker threads. A job runs the request's stages
//! (retrieve, build the prompt, generate) off the async runtime and streams events back over
//! its own channel. A full queue refuses at once; a job whose client has gone is dropped.

mod prompt;
mod tta_params;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

pub use prompt::RagPrompt;
pub use tta_params::{resolve_tta, ParamError, TtaOverrides};

use crate::adapt::{
    adapt_full, adapt_lora, build_pairs, encode_pairs, PairOptions, TrainParams, TtaReport,
};
use crate::gate::assess::GateReport;
use crate::gate::card::LoadedGate;
use crate::gate::features::PromptTooLong;
use crate::gate::policy::Policy;
use crate::generate::{generate_scoring, ContinuationScore, FinishReason, GenError, GenParams};
use crate::model::{Adapter, ChatMessage, Model};
use crate::retrieval::{Collections, Passage};

/// How retrieval takes part in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RagMode {
    /// Retrieve, put the passages in the prompt, answer.
    Static,
    /// Retrieve, adapt the model to the passages for this request only, then answer.
    Tta,
    /// No retrieval.
    None,
}

impl RagMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Tta => "tta",
            Self::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "static" => Some(Self::Static),
            "tta" => Some(Self::Tta),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Retrieval settings of one request, resolved against the config.
#[derive(Debug, Clone)]
pub struct RagParams {
    /// With `gate` set: what runs when the gate retrieves.
    pub mode: RagMode,
    pub collection: String,
    pub top_k: usize,
    /// Request mode `auto`: the gate decides under this policy whether `mode` runs at all.
    pub gate: Option<Policy>,
}

/// Which weights test-time adaptation trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TtaScope {
    /// Per-request low-rank adapters; the shared weights are read only.
    Lora,
    /// Every weight, on a private copy; serialised to bound memory.
    Full,
}

impl TtaScope {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "lora" => Some(Self::Lora),
            "full" => Some(Self::Full),
            _ => None,
        }
    }
}

/// What a request answers with after adaptation.
enum Adapted {
    Base,
    Lora(crate::adapt::Lora),
    Full(crate::model::Decoder),
}

/// Adaptation settings of one request (mode `tta`), validated and capped.
#[derive(Debug, Clone)]
pub struct TtaParams {
    pub scope: TtaScope,
    pub pairs: PairOptions,
    pub train: TrainParams,
}

/// One validated chat request, independent of the wire format.
#[derive(Debug, Clone)]
pub struct ChatJob {
    pub messages: Vec<ChatMessage>,
    pub gen: GenParams,
    pub rag: RagParams,
    /// Set when `rag.mode` is `tta`.
    pub tta: Option<TtaParams>,
    /// Answer choices to rank by likelihood under the same (adapted) model, after the answer
    /// is generated; empty for ordinary requests.
    pub score_choices: Vec<String>,
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
    /// One score per `ChatJob::score_choices`, in order.
    pub choice_scores: Vec<ContinuationScore>,
}

/// Errors a request can end with.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("server is overloaded: {0} requests already queued; retry later")]
    Overloaded(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("{0}")]
    ContextExceeded(String),
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
    reply: mpsc::UnboundedSender<Event>,
    enqueued: Instant,
}

/// Clonable handle to the engine; dropping the last one stops the workers.
#[derive(Clone)]
pub struct Engine {
    tx: crossbeam_channel::Sender<Job>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    pub model: Arc<Model>,
    pub collections: Arc<Collections>,
}

/// Engine sizing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub workers: usize,
    pub queue_capacity: usize,
    pub prompt_template: String,
    /// The retrieval gate for requests in mode `auto`; such requests fail without one.
    pub gate: Option<Arc<LoadedGate>>,
}

struct Worker {
    model: Arc<Model>,
    collections: Arc<Collections>,
    prompt: Arc<RagPrompt>,
    queued: Arc<AtomicUsize>,
    /// Held while a full-weight adaptation and its answer run: one private weight copy at a time.
    full_scope: Arc<std::sync::Mutex<()>>,
    gate: Option<Arc<LoadedGate>>,
}

impl Engine {
    pub fn start(
        model: Arc<Model>,
        collections: Arc<Collections>,
        cfg: &EngineConfig,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(cfg.queue_capacity);
        let queued = Arc::new(AtomicUsize::new(0));
        let prompt = Arc::new(RagPrompt::new(&cfg.prompt_template)?);
        let full_scope = Arc::new(std::sync::Mutex::new(()));
        for i in 0..cfg.workers.max(1) {
            let rx = rx.clone();
            let w = Worker {
                model: model.clone(),
                collections: collections.clone(),
                prompt: prompt.clone(),
                queued: queued.clone(),
                full_scope: full_scope.clone(),
                gate: cfg.gate.clone(),
            };
            std::thread::Builder::new()
                .name(format!("model-worker-{i}"))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        w.queued.fetch_sub(1, Ordering::SeqCst);
                        w.run(job);
                    }
                })?;
        }
        Ok(Self {
            tx,
            queued,
            capacity: cfg.queue_capacity,
            model,
            collections,
        })
    }

    /// Requests waiting for a worker.
    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Queues a request; fails at once when the queue is full.
    pub fn submit(&self, req: ChatJob) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let (reply, rx) = mpsc::unbounded_channel();
        let job = Job {
            req,
            reply,
            enqueued: Instant::now(),
        };
        self.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => Ok(rx),
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::SeqCst);
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

impl Worker {
    fn run(&self, job: Job) {
        if job.reply.is_closed() {
            return; // the client left while the job was queued
        }
        let span = tracing::info_span!("request", mode = ?job.req.rag.mode);
        let _g = span.enter();
        let queue_ms = job.enqueued.elapsed().as_secs_f64() * 1e3;
        match self.process(&job.req, &job.reply, queue_ms) {
            Ok(c) => {
                let _ = job.reply.send(Event::Done(Box::new(c)));
            }
            Err(Some(e)) => {
                tracing::warn!(error = %e, "request failed");
                let _ = job.reply.send(Event::Error(e));
            }
            Err(None) => tracing::debug!("client went away; request cancelled"),
        }
    }

    /// Trains this request's adapter on prefix/suffix pairs cut from the passages.
    fn adapt(
        &self,
        req: &ChatJob,
        params: &TtaParams,
        passages: &[Passage],
    ) -> anyhow::Result<(Adapted, TtaReport)> {
        let texts: Vec<&str> = passages.iter().map(|p| p.text.as_str()).collect();
        let set = build_pairs(&texts, &params.pairs);
        let query = if params.train.condition_on_query {
            RagPrompt::question(&req.messages)
        } else {
            None
        };
        let examples = encode_pairs(
            &self.model,
            &set.pairs,
            query,
            params.train.max_tokens_per_pair,
        )?;
        let span = tracing::info_span!("adapt", pairs = examples.len());
        let _g = span.enter();
        let dec = &self.model.decoder;
        Ok(match params.scope {
            TtaScope::Lora => {
                let (l, r) = adapt_lora(dec, &examples, set.source, &params.train)?;
                (l.map_or(Adapted::Base, Adapted::Lora), r)
            }
            TtaScope::Full => {
                let (d, r) = adapt_full(dec, &examples, set.source, &params.train)?;
                (d.map_or(Adapted::Base, Adapted::Full), r)
            }
        })
    }

    /// `Err(None)` means the client went away.
    fn process(
        &self,
        req: &ChatJob,
        reply: &mpsc::UnboundedSender<Event>,
        queue_ms: f64,
    ) -> Result<Completion, Option<EngineError>> {
        let internal = |e: String| Some(EngineError::Internal(e));
        let mut timings = Timings {
            queue: queue_ms,
            ..Default::default()
        };

        let retrieve = |timings: &mut Timings| {
            let t = Instant::now();
            let question = RagPrompt::question(&req.messages).unwrap_or("");
            let coll = self
                .collections
                .get(&req.rag.collection)
                .map_err(|e| internal(e.to_string()))?;
            let hits = coll
                .search(question, req.rag.top_k)
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
                    let m = self
                        .prompt
                        .apply(&req.messages, &hits)
                        .map_err(|e| internal(e.to_string()))?;
                    retrieved = Some(hits);
                    Some(m)
                } else {
                    None
                };
                let report = g
                    .assess(&self.model, &req.messages, with_passages.as_deref(), policy)
                    .map_err(|e| match e.downcast_ref::<PromptTooLong>() {
                        Some(t) => Some(EngineError::ContextExceeded(t.to_string())),
                        None => internal(format!("{e:#}")),
                    })?;
                timings.gate = report.gate_ms;
                if !report.decision.retrieves() {
                    mode = RagMode::None;
                }
                Some(report)
            }
        };

        let (collection, passages) = match mode {
            RagMode::None => (None, vec![]),
            RagMode::Static | RagMode::Tta => {
                let hits = match retrieved {
                    Some(h) => h,
                    None => retrieve(&mut timings)?,
                };
                (Some(req.rag.collection.clone()), hits)
            }
        };

        let full = matches!(&req.tta, Some(p) if p.scope == TtaScope::Full) && mode == RagMode::Tta;
        // A poisoned lock only means another request panicked; the guard protects no data.
        let _serial = full.then(|| {
            self.full_scope
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        });
        let (adapted, tta) = match (&req.tta, mode) {
            (Some(params), RagMode::Tta) => {
                let (adapted, report) = self
                    .adapt(req, params, &passages)
                    .map_err(|e| internal(e.to_string()))?;
                timings.adapt = report.adapt_ms;
                (adapted, Some(report))
            }
            _ => (Adapted::Base, None),
        };

        let messages = self
            .prompt
            .apply(&req.messages, &passages)
            .map_err(|e| internal(e.to_string()))?;
        let prompt = self
            .model
            .render_chat(&messages)
            .map_err(|e| internal(e.to_string()))?;
        let ids = self
            .model
            .tokenizer
            .encode(&prompt)
            .map_err(|e| internal(e.to_string()))?;

        let mut on_text = |t: &str| reply.send(Event::Text(t.to_string())).is_ok();
        let (dec, adapter): (&crate::model::Decoder, Option<&dyn Adapter>) = match &adapted {
            Adapted::Base => (&self.model.decoder, None),
            Adapted::Lora(l) => (&self.model.decoder, Some(l)),
            Adapted::Full(d) => (d, None),
        };
        let conts = req
            .score_choices
            .iter()
            .map(|c| self.model.tokenizer.encode(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| internal(e.to_string()))?;
        let gen = generate_scoring(
            &self.model,
            dec,
            &ids,
            &req.gen,
            adapter,
            &conts,
            &mut on_text,
        );
        let (out, choice_scores) = match gen {
            Ok(o) => o,
            Err(GenError::Cancelled) => return Err(None),
            Err(e @ GenError::ContextExceeded { .. }) => {
                return Err(Some(EngineError::ContextExceeded(e.to_string())))
            }
            Err(e) => return Err(internal(e.to_string())),
        };
        timings.prefill = out.prefill_ms;
        timings.decode = out.decode_ms;
        Ok(Completion {
            text: out.text,
            finish_reason: out.finish_reason,
            prompt_tokens: ids.len(),
            completion_tokens: out.completion_tokens,
            rag: RagReport {
                mode,
                collection,
                passages,
                tta,
                gate,
                timings_ms: timings,
            },
            choice_scores,
        })
    }
}
