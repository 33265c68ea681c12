//! The one place where errors become HTTP statuses and OpenAI's error JSON.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::engine::EngineError;

/// An error as the client sees it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (refusals the client may simply retry).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
            retry_after: None,
        }
    }

    /// A 5xx of the server's own making.
    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// Reads a JSON request body into `T`; an unreadable or malformed body becomes the 4xx that
/// names the problem.
pub fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rej| {
        ApiError::invalid(
            format!("could not read the request body: {}", rej.body_text()),
            None,
        )
        .with_status(rej.status())
    })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(
            format!("request body is not valid JSON for this endpoint: {e}"),
            None,
        )
    })
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let msg = e.to_string();
        match e {
            EngineError::Overloaded(_) => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: msg,
                kind: "rate_limit_error",
                param: None,
                code: Some("overloaded"),
                retry_after: Some(1),
            },
            EngineError::Busy(_) => Self::server(StatusCode::SERVICE_UNAVAILABLE, msg)
                .with_code("busy")
                .with_retry_after(5),
            EngineError::Stopped => Self::server(StatusCode::SERVICE_UNAVAILABLE, msg),
            EngineError::ContextExceeded(_) => {
                Self::invalid(msg, Some("messages")).with_code("context_length_exceeded")
            }
            EngineError::Invalid(_) => Self::invalid(msg, Some("messages")),
            EngineError::BadParam { param, code, .. } => {
                Self::invalid(msg, Some(param)).with_code(code)
            }
            EngineError::DeadlineExceeded(_) => {
                Self::server(StatusCode::GATEWAY_TIMEOUT, msg).with_code("timeout")
            }
            EngineError::Panicked => {
                Self::server(StatusCode::INTERNAL_SERVER_ERROR, msg).with_code("internal_error")
            }
            EngineError::Internal(_) => Self::server(StatusCode::INTERNAL_SERVER_ERROR, msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}
