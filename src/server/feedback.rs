//! `POST /v1/feedback`: a verdict on one earlier in-experiment response, credited to the arm that
//! served it. Only responses served by an arm are remembered: feedback on anything else could
//! not be attributed to a treatment, so it is answered 404 like an unknown id.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::experiment::{Feedback, Refused};
use super::App;

/// Longest accepted comment, in characters. Comments are only logged, never stored.
const MAX_COMMENT_CHARS: usize = 2000;

/// `rating` is an integer from 1 (bad) to 5 (good): the familiar star scale, with no doubt
/// about which end is better or whether 0 means "no rating".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    id: Option<String>,
    correct: Option<bool>,
    rating: Option<f64>,
    comment: Option<String>,
}

fn parse_id(id: &str) -> Option<u128> {
    let hex = id.strip_prefix("chatcmpl-")?;
    uuid::Uuid::try_parse(hex).ok().map(|u| u.as_u128())
}

pub async fn feedback(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: FeedbackRequest = super::error::json_body(body)?;
    let id = req.id.ok_or_else(|| {
        ApiError::invalid("`id` (the chat completion id) is required", Some("id"))
    })?;
    if req.correct.is_none() && req.rating.is_none() {
        return Err(ApiError::invalid(
            "give `correct` (true/false) and/or `rating` (integer 1..5)",
            None,
        ));
    }
    if let Some(r) = req.rating {
        if !(r.fract() == 0.0 && (1.0..=5.0).contains(&r)) {
            return Err(ApiError::invalid(
                format!("rating {r} is not an integer from 1 to 5"),
                Some("rating"),
            ));
        }
    }
    if let Some(c) = &req.comment {
        if c.chars().count() > MAX_COMMENT_CHARS {
            return Err(ApiError::invalid(
                format!("comment is longer than {MAX_COMMENT_CHARS} characters"),
                Some("comment"),
            ));
        }
    }
    let verdict = Feedback {
        correct: req.correct,
        rating: req.rating,
    };
    let claimed = match parse_id(&id) {
        Some(key) => app.ab.claim(key, &verdict).await,
        None => Err(Refused::Unknown),
    };
    let arm = match claimed {
        Ok(arm) => arm,
        Err(Refused::Unknown) => {
            return Err(ApiError::invalid(
                format!(
                    "no response `{id}` awaits feedback: the id is unknown, {}, or its response \
                     was not served by an A/B arm",
                    app.ab.unknown_because()
                ),
                Some("id"),
            )
            .with_status(StatusCode::NOT_FOUND)
            .with_code("unknown_response"));
        }
        Err(Refused::Duplicate) => {
            return Err(ApiError::invalid(
                format!("response `{id}` already has feedback"),
                Some("id"),
            )
            .with_status(StatusCode::CONFLICT)
            .with_code("duplicate_feedback"))
        }
        Err(Refused::Unavailable(why)) => {
            return Err(ApiError::server(StatusCode::SERVICE_UNAVAILABLE, why)
                .with_code("ab_store_unavailable")
                .with_retry_after(1))
        }
    };
    let name = app
        .ab
        .arms
        .get(arm)
        .map(|a| a.name.clone())
        .unwrap_or_default();
    let signal = |s: &str| app.metrics.feedback.with_label_values(&[&name, s]).inc();
    match req.correct {
        Some(true) => signal("correct"),
        Some(false) => signal("incorrect"),
        None => {}
    }
    if req.rating.is_some() {
        signal("rating");
    }
    tracing::info!(
        id = %id,
        arm = %name,
        correct = ?req.correct,
        rating = ?req.rating,
        comment = req.comment.as_deref().unwrap_or(""),
        "feedback"
    );
    Ok(Json(json!({"id": id, "arm": name, "recorded": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_only_from_our_format() {
        let u = uuid::Uuid::new_v4();
        assert_eq!(
            parse_id(&format!("chatcmpl-{}", u.simple())),
            Some(u.as_u128())
        );
        assert_eq!(parse_id("chatcmpl-nothex"), None);
        assert_eq!(parse_id(&u.simple().to_string()), None);
    }
}
