//! The live A/B experiment between RAG arms: which arm serves a request ([`arms`]), what is
//! recorded when it ends, feedback credited to the arm that served, and the per-arm summary
//! with its statistics ([`stats`], [`compare`]). The state lives in a store: this process's
//! memory, or PostgreSQL shared by every replica ([`postgres`]). The HTTP handlers are in
//! `server/ab.rs` and `server/feedback.rs`.

pub mod arms;
pub mod compare;
mod memory;
mod postgres;
pub mod stats;

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use axum::http::StatusCode;

use crate::config::AbSection;
use crate::engine::RagReport;

use super::metrics::Metrics;
use arms::Arms;
use memory::MemoryStore;
use postgres::PostgresStore;
use stats::ArmTotals;

/// How a request ended, for the metrics and the arm's statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Status(StatusCode),
    /// The client went away before the answer was complete.
    Cancelled,
}

impl End {
    /// The `status` label: the HTTP status code, or `cancelled`.
    pub fn label(self) -> String {
        match self {
            Self::Status(s) => s.as_str().to_string(),
            Self::Cancelled => "cancelled".to_string(),
        }
    }
}

/// One finished in-experiment request.
#[derive(Debug, Clone)]
pub struct Record {
    /// The uuid inside the response id `chatcmpl-<uuid>`.
    pub id: u128,
    pub arm: usize,
    pub end: End,
    pub ms: f64,
    /// The adaptation's loss change, when it adapted and both losses were finite.
    pub loss_delta: Option<f64>,
}

impl Record {
    pub fn ok(&self) -> bool {
        matches!(self.end, End::Status(s) if s.is_success())
    }
}

/// A verdict on one response.
#[derive(Debug, Clone, Copy)]
pub struct Feedback {
    pub correct: Option<bool>,
    /// An integer from 1 to 5.
    pub rating: Option<f64>,
}

/// Why feedback cannot be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// No successful in-experiment response has this id (or it aged out of the window).
    Unknown,
    /// It already has feedback.
    Duplicate,
    /// The shared store did not answer.
    Unavailable(String),
}

/// The arm that served the response, once its feedback is taken.
pub type Claim = Result<usize, Refused>;

enum Store {
    Memory(MemoryStore),
    Postgres(PostgresStore),
}

/// The experiment's live state.
pub struct Experiment {
    pub arms: Arms,
    store: Store,
    feedback_window: usize,
    write_wait: Duration,
}

/// A panic elsewhere while holding the lock leaves plain counters behind: keep using them.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Resolves once a record is stored (or the store gave up on it).
pub type Stored = tokio::sync::oneshot::Receiver<()>;

impl Experiment {
    /// The experiment `cfg` describes. A PostgreSQL store connects lazily; [`Self::open`] checks
    /// it before the server takes traffic.
    pub fn new(cfg: &AbSection) -> anyhow::Result<Self> {
        let store = match cfg.store.as_str() {
            "postgres" => Store::Postgres(PostgresStore::new(cfg)?),
            _ => Store::Memory(MemoryStore::new(cfg.arms.len(), cfg.feedback_window)),
        };
        Ok(Self {
            arms: Arms::new(&cfg.arms),
            store,
            feedback_window: cfg.feedback_window,
            write_wait: Duration::from_millis(cfg.write_wait_ms),
        })
    }

    /// Besides an unknown id, why feedback finds no response: what this store forgets.
    pub fn unknown_because(&self) -> String {
        match self.store {
            Store::Memory(_) => {
                format!("older than the last {} A/B responses", self.feedback_window)
            }
            Store::Postgres(_) => "its answer failed or was cancelled".into(),
        }
    }

    /// Prepares the shared store: its tables, and the arms this experiment was first started
    /// with, which must equal this replica's (else an error: two replicas serving different
    /// arms under one name would mix their statistics). Starts the writer; `replica` names this
    /// process in every row it writes. Nothing to do for the memory store.
    pub async fn open(&self, cfg: &AbSection, replica: &str) -> anyhow::Result<()> {
        match &self.store {
            Store::Memory(_) => Ok(()),
            Store::Postgres(p) => p.open(cfg, replica).await,
        }
    }

    /// Waits, up to `within`, until every record handed over so far is stored.
    pub async fn close(&self, within: Duration) {
        if let Store::Postgres(p) = &self.store {
            p.flush(within).await;
        }
    }

    /// How long an answer waits for its record to be stored.
    pub fn write_wait(&self) -> Duration {
        self.write_wait
    }

    /// What `/health` shows of the store.
    pub fn health(&self) -> serde_json::Value {
        match &self.store {
            Store::Memory(_) => serde_json::json!({"store": "memory"}),
            Store::Postgres(p) => p.health(),
        }
    }

    /// Records how a request served by `arm` ended. Latency counts successes only, so fast
    /// refusals (429) do not flatter a slow arm. With a shared store the record is written in
    /// the background; the returned receiver resolves once it is stored.
    pub fn finish(
        &self,
        metrics: &Metrics,
        arm: usize,
        id: u128,
        end: End,
        secs: f64,
        report: Option<&RagReport>,
    ) -> Option<Stored> {
        let cfg = self.arms.get(arm)?;
        let name = cfg.name.as_str();
        let tta = report.and_then(|r| r.tta.as_ref());
        let record = Record {
            id,
            arm,
            end,
            ms: secs * 1e3,
            loss_delta: tta.and_then(|t| t.loss_delta()),
        };
        metrics
            .arm_requests
            .with_label_values(&[name, &end.label()])
            .inc();
        if record.ok() {
            metrics.arm_latency.with_label_values(&[name]).observe(secs);
        }
        if let Some(d) = record.loss_delta {
            metrics.arm_loss_delta.with_label_values(&[name]).observe(d);
        }
        if let Some(fallback) = tta.and_then(|t| t.fallback.as_ref()) {
            metrics
                .arm_fallbacks
                .with_label_values(&[name, fallback.label()])
                .inc();
        }
        match &self.store {
            Store::Memory(m) => {
                m.record(&record);
                None
            }
            Store::Postgres(p) => p.record(name, &record),
        }
    }

    /// Takes feedback on response `id` once, whichever replica served it.
    pub async fn claim(&self, id: u128, feedback: &Feedback) -> Claim {
        match &self.store {
            Store::Memory(m) => m.claim(id, feedback),
            Store::Postgres(p) => {
                let name = p.claim(id, feedback).await?;
                self.arms
                    .iter()
                    .position(|a| a.name == name)
                    .ok_or_else(|| Refused::Unavailable(format!("stored arm `{name}` is unknown")))
            }
        }
    }

    /// Every arm's totals, in the arms' order: all replicas' traffic with a shared store.
    pub async fn totals(&self) -> Result<Vec<ArmTotals>, String> {
        match &self.store {
            Store::Memory(m) => Ok(m.totals()),
            Store::Postgres(p) => {
                let by_name = p.totals().await?;
                Ok(self
                    .arms
                    .iter()
                    .map(|a| by_name.get(&a.name).cloned().unwrap_or_default())
                    .collect())
            }
        }
    }
}
