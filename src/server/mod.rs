//! The HTTP layer: OpenAI-compatible routes over the engine. No tensor is touched here.

mod ab;
mod auth;
mod chat;
mod citations;
mod collections;
mod error;
pub mod experiment;
mod feedback;
mod metrics;
mod openai;
mod validate;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};

pub use error::ApiError;
pub use experiment::Experiment;
pub use metrics::Metrics;

use crate::config::Config;
use crate::engine::Engine;

/// Shared state of the HTTP handlers.
pub struct App {
    pub engine: Engine,
    pub config: Config,
    pub metrics: Metrics,
    /// The live A/B test between RAG arms (`[ab]`); inert when no arms are configured.
    pub ab: Experiment,
    pub started: u64,
    /// `[auth]`'s keys as digests, and their concurrency slots.
    pub(crate) auth: auth::Keys,
    /// Chat requests between arrival and their last byte (or their client's departure).
    pub in_flight: AtomicUsize,
    /// Set on SIGTERM: new requests get 503 while in-flight ones finish.
    draining: AtomicBool,
    /// Set while the start-up warm-up runs: `/ready` says 503 until it is done.
    warming: AtomicBool,
    /// This process's name among replicas (`server.replica_id`, else `host:port`), sent as
    /// the `x-ttarag-replica` header and written with every shared A/B record.
    replica: std::sync::OnceLock<String>,
}

impl App {
    pub fn new(engine: Engine, config: Config) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            ab: Experiment::new(&config.ab)?,
            auth: auth::Keys::new(&config.auth),
            engine,
            config,
            metrics: Metrics::new(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            warming: AtomicBool::new(false),
            replica: std::sync::OnceLock::new(),
        }))
    }

    /// Names this replica (once; later calls are ignored).
    pub fn set_replica(&self, name: &str) {
        let _ = self.replica.set(name.to_string());
    }

    pub fn replica(&self) -> Option<&str> {
        self.replica.get().map(String::as_str)
    }

    /// Marks the server as warming up (not ready) or done.
    pub fn set_warming(&self, on: bool) {
        self.warming.store(on, Ordering::SeqCst);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn request_timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.config.server.request_timeout_ms))
    }

    /// What `/health` and `/ready` report; ready = a worker alive, warmed up and not draining.
    fn readiness(&self) -> (bool, serde_json::Value) {
        let h = self.engine.health();
        let alive = h.workers_alive();
        let draining = self.draining();
        let status = match (alive, h.scheduler_alive(), draining) {
            (_, _, true) => Readiness::Draining,
            (0, _, false) | (_, false, false) => Readiness::Unavailable,
            _ if self.warming.load(Ordering::SeqCst) => Readiness::Warming,
            _ => Readiness::Ok,
        };
        let body = serde_json::json!({
            "status": status,
            "model": self.engine.model.id,
            "workers": self.engine.workers(),
            "workers_alive": alive,
            "draining": draining,
            "in_flight": self.in_flight(),
            "queue_depth": self.engine.queue_depth(),
            "queue_capacity": self.config.server.queue_capacity,
            "worker_panics": h.panics(),
            "scheduler_alive": h.scheduler_alive(),
            "running": h.running(),
            "max_running": self.config.server.max_running,
            "kv_cache_bytes": h.kv_bytes(),
            "adapt_memory_bytes": self.engine.adapt_memory().used(),
            "adapt_memory_limit_bytes": self.engine.adapt_memory().limit(),
            "replica": self.replica(),
            "ab": self.ab.health(),
        });
        (status == Readiness::Ok, body)
    }
}

/// The `status` of `/health` and `/ready`: only `ok` is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Readiness {
    Ok,
    /// The start-up warm-up is still running.
    Warming,
    /// SIGTERM came: in-flight requests finish, new ones get 503.
    Draining,
    /// No stage worker or no decode scheduler is alive.
    Unavailable,
}

/// Warms the engine up through its own path (see [`crate::engine::warm_up`]): a short answer,
/// and when the configured scope is LoRA one adaptation step on the default collection. Marks
/// the server ready afterwards whatever happened; a failure is logged (a broken engine shows in
/// `/health` on its own). Blocks: run it on a thread of its own.
pub fn warm_up(app: &App) -> Option<crate::engine::WarmUp> {
    let cfg = &app.config;
    let overrides = crate::engine::TtaOverrides {
        steps: Some(1),
        ..Default::default()
    };
    let tta = (cfg.tta.scope == "lora")
        .then(|| crate::engine::resolve_tta(&cfg.tta, &overrides, 0).ok())
        .flatten();
    let done = crate::engine::warm_up(&app.engine, &cfg.retrieval.collection, tta);
    app.set_warming(false);
    match done {
        Ok(w) => {
            tracing::info!(
                answer_ms = w.answer.as_millis() as u64,
                adapt_ms = w.adapt.map(|d| d.as_millis() as u64),
                "warmed up"
            );
            Some(w)
        }
        Err(e) => {
            tracing::warn!(error = %e, "warm-up failed; serving anyway");
            None
        }
    }
}

/// The full router: `/v1/chat/completions`, `/v1/feedback`, `/v1/ab/summary`, `/v1/models`,
/// `/v1/collections` (and its documents), `/ab`, `/health`, `/ready`, `/metrics`.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.config.server.max_body_bytes;
    Router::new()
        .route(
            "/v1/chat/completions",
            post(chat::chat_completions).layer(axum::middleware::from_fn_with_state(
                app.clone(),
                auth::limit_per_key,
            )),
        )
        .route("/v1/feedback", post(feedback::feedback))
        .route("/v1/ab/summary", get(ab::summary))
        .route("/ab", get(ab::page))
        .route("/v1/models", get(models))
        .route("/v1/collections", get(collections::list))
        .route("/v1/collections/{name}/search", get(collections::search))
        .route(
            "/v1/collections/{name}",
            delete(collections::delete_collection),
        )
        .route(
            "/v1/collections/{name}/documents",
            post(collections::ingest)
                .layer(DefaultBodyLimit::max(app.config.retrieval.max_ingest_bytes)),
        )
        .route(
            "/v1/collections/{name}/documents/{id}",
            delete(collections::delete_document),
        )
        .route("/health", get(health))
        .route("/ready", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        // Outside the routes, so the fallback is covered too and no body is read before the key.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::authenticate,
        ))
        .layer(axum::middleware::map_response_with_state(
            app.clone(),
            name_replica,
        ))
        .with_state(app)
}

/// Says which replica answered, so a client or an operator behind a load balancer can tell.
async fn name_replica(
    State(app): State<Arc<App>>,
    mut res: axum::response::Response,
) -> axum::response::Response {
    if let Some(v) = app
        .replica()
        .and_then(|r| axum::http::HeaderValue::from_str(r).ok())
    {
        res.headers_mut().insert("x-ttarag-replica", v);
    }
    res
}

async fn models(State(app): State<Arc<App>>) -> Json<openai::ModelList> {
    Json(openai::ModelList {
        object: "list",
        data: vec![openai::ModelCard {
            id: app.engine.model.id.clone(),
            object: "model",
            created: app.started,
            owned_by: "ttarag",
        }],
    })
}

/// `/health` and `/ready`: 200 while a worker is alive and the server is not draining, else
/// 503 (a load balancer then stops sending traffic here); the body says why either way.
async fn health(State(app): State<Arc<App>>) -> impl IntoResponse {
    let (ready, body) = app.readiness();
    let status = match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, Json(body))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.metrics.observe_engine(&app.engine, app.in_flight());
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn not_found() -> ApiError {
    ApiError::invalid("no such route", None).with_status(StatusCode::NOT_FOUND)
}
