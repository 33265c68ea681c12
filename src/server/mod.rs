//! The HTTP layer: OpenAI-compatible routes over the engine. No tensor is touched here.

mod ab;
mod ab_stats;
mod chat;
mod error;
mod feedback;
mod metrics;
mod openai;
mod validate;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};

pub use ab::Experiment;
pub use error::ApiError;
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
}

impl App {
    pub fn new(engine: Engine, config: Config) -> Arc<Self> {
        Arc::new(Self {
            ab: Experiment::new(&config.ab),
            engine,
            config,
            metrics: Metrics::new(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }
}

/// The full router: `/v1/chat/completions`, `/v1/feedback`, `/v1/ab/summary`, `/v1/models`,
/// `/health`, `/metrics`.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.config.server.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/feedback", post(feedback::feedback))
        .route("/v1/ab/summary", get(ab_stats::summary))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
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

async fn health(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "model": app.engine.model.id,
        "queue_depth": app.engine.queue_depth(),
        "queue_capacity": app.config.server.queue_capacity,
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.metrics.queue_depth.set(app.engine.queue_depth() as i64);
    (
        [("content-type", "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
}

async fn not_found() -> ApiError {
    ApiError::invalid("no such route", None).with_status(StatusCode::NOT_FOUND)
}
