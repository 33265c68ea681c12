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
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(String::from),
            code: None,
        }
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
            },
            EngineError::Stopped => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: msg,
                kind: "server_error",
                param: None,
                code: None,
            },
            EngineError::ContextExceeded(_) => {
                Self::invalid(msg, Some("messages")).with_code("context_length_exceeded")
            }
            EngineError::Internal(_) => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: msg,
                kind: "server_error",
                param: None,
                code: None,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}
