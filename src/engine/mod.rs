//! The engine: one bounded queue feeding model worker threads. A job runs the request's stages
//! (retrieve, build the prompt, generate) off the async runtime and streams events back over
//! its own channel. A full queue refuses at once; a job whose client has gone is dropped.

mod prompt;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

pub use prompt::RagPrompt;

use crate::generate::{generate, FinishReason, GenError, GenParams};
use crate::model::{ChatMessage, Model};
use crate::retrieval::{Collections, Passage};

/// How retrieval takes part in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RagMode {
    /// Retrieve, put the passages in the prompt, answer.
    Static,
    /// No retrieval.
    None,
}

impl RagMode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "static" => Some(Self::Static),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Retrieval settings of one request, resolved against the config.
#[derive(Debug, Clone)]
pub struct RagParams {
    pub mode: RagMode,
    pub collection: String,
    pub top_k: usize,
}

/// One validated chat request, independent of the wire format.
#[derive(Debug, Clone)]
pub struct ChatJob {
    pub messages: Vec<ChatMessage>,
    pub gen: GenParams,
    pub rag: RagParams,
}

/// Per-stage wall time in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub queue: f64,
    pub retrieve: f64,
    pub prefill: f64,
    pub decode: f64,
}

/// What retrieval did for a request (the response's `rag` extension).
#[derive(Debug, Clone, Serialize)]
pub struct RagReport {
    pub mode: RagMode,
    pub collection: Option<String>,
    pub passages: Vec<Passage>,
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
}

struct Worker {
    model: Arc<Model>,
    collections: Arc<Collections>,
    prompt: Arc<RagPrompt>,
    queued: Arc<AtomicUsize>,
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
        for i in 0..cfg.workers.max(1) {
            let rx = rx.clone();
            let w = Worker {
                model: model.clone(),
                collections: collections.clone(),
                prompt: prompt.clone(),
                queued: queued.clone(),
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

        let t = Instant::now();
        let (collection, passages) = match req.rag.mode {
            RagMode::None => (None, vec![]),
            RagMode::Static => {
                let question = RagPrompt::question(&req.messages).unwrap_or("");
                let coll = self
                    .collections
                    .get(&req.rag.collection)
                    .map_err(|e| internal(e.to_string()))?;
                let hits = coll
                    .search(question, req.rag.top_k)
                    .map_err(|e| internal(e.to_string()))?;
                (Some(req.rag.collection.clone()), hits)
            }
        };
        timings.retrieve = t.elapsed().as_secs_f64() * 1e3;

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
        let out = match generate(&self.model, &ids, &req.gen, None, &mut on_text) {
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
                mode: req.rag.mode,
                collection,
                passages,
                timings_ms: timings,
            },
        })
    }
}
