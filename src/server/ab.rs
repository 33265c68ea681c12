//! The A/B experiment's read side over HTTP: `GET /v1/ab/summary` and the `GET /ab` page.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use super::error::ApiError;
use super::experiment::stats::{summarize, Summary};
use super::App;

/// `GET /v1/ab/summary`: every arm's totals and its comparison with the baseline; with a shared
/// store, over every replica's traffic.
pub async fn summary(State(app): State<Arc<App>>) -> Result<Json<Summary>, ApiError> {
    let totals = app.ab.totals().await.map_err(|e| {
        ApiError::server(StatusCode::SERVICE_UNAVAILABLE, e)
            .with_code("ab_store_unavailable")
            .with_retry_after(1)
    })?;
    Ok(Json(summarize(&app.ab.arms, &totals)))
}

/// `GET /ab`: the experiment's page, embedded in the binary (no build step); it reads
/// `/v1/ab/summary` from the browser.
pub async fn page() -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("ab_page.html"),
    )
}
