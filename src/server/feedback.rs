//! `POST /v1/feedback`: a verdict on one earlier in-experiment response, credited to the arm that
//! served it. Only responses served by an arm are remembered: feedback on anything else could
//! not be attributed to a treatment, so it is answered 404 like an unknown id.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::ab::lock;
use super::error::ApiError;
use super::App;

/// Longest accepted comment, in characters. Comments are only logged, never stored.
const MAX_COMMENT_CHARS: usize = 2000;

/// Which arm served each of the last `cap` in-experiment responses, oldest evicted first, so
/// memory stays bounded whatever the traffic. Ids are the uuid inside `chatcmpl-<uuid>`.
#[derive(Debug)]
pub struct ResponseLog {
    cap: usize,
    order: VecDeque<u128>,
    served: HashMap<u128, Served>,
}

#[derive(Debug, Clone, Copy)]
struct Served {
    arm: usize,
    /// Kept after feedback so a second verdict is refused rather than counted twice.
    rated: bool,
}

/// Why feedback cannot be taken.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Unknown,
    Duplicate,
}

impl ResponseLog {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            order: VecDeque::new(),
            served: HashMap::new(),
        }
    }

    pub fn remember(&mut self, id: u128, arm: usize) {
        if self.cap == 0 || self.served.contains_key(&id) {
            return;
        }
        self.served.insert(id, Served { arm, rated: false });
        self.order.push_back(id);
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.served.remove(&old);
            }
        }
    }

    /// Marks `id` as rated and returns its arm.
    pub fn claim(&mut self, id: u128) -> Result<usize, Refused> {
        let s = self.served.get_mut(&id).ok_or(Refused::Unknown)?;
        if s.rated {
            return Err(Refused::Duplicate);
        }
        s.rated = true;
        Ok(s.arm)
    }
}

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
    let claimed = match parse_id(&id) {
        Some(key) => lock(&app.ab.log).claim(key),
        None => Err(Refused::Unknown),
    };
    let arm = match claimed {
        Ok(arm) => arm,
        Err(Refused::Unknown) => {
            return Err(ApiError::invalid(
                format!(
                    "no response `{id}` awaits feedback: the id is unknown, older than the last {} \
                     A/B responses, or its response was not served by an A/B arm",
                    app.ab.feedback_window
                ),
                Some("id"),
            )
            .with_status(StatusCode::NOT_FOUND)
            .with_code("unknown_response"))
        }
        Err(Refused::Duplicate) => {
            return Err(ApiError::invalid(
                format!("response `{id}` already has feedback"),
                Some("id"),
            )
            .with_status(StatusCode::CONFLICT)
            .with_code("duplicate_feedback"))
        }
    };
    let name = app
        .ab
        .arms
        .get(arm)
        .map(|a| a.name.clone())
        .unwrap_or_default();
    if let Some(s) = lock(&app.ab.stats).get_mut(arm) {
        s.record_feedback(req.correct, req.rating);
    }
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
    fn log_is_bounded_and_refuses_duplicates() {
        let mut log = ResponseLog::new(3);
        for id in 0..10u128 {
            log.remember(id, (id % 2) as usize);
        }
        assert_eq!(log.served.len(), 3);
        assert_eq!(log.order.len(), 3);
        assert_eq!(log.claim(2), Err(Refused::Unknown));
        assert_eq!(log.claim(9), Ok(1));
        assert_eq!(log.claim(9), Err(Refused::Duplicate));
        assert_eq!(log.claim(8), Ok(0));
        // A rated entry still ages out.
        for id in 10..13u128 {
            log.remember(id, 0);
        }
        assert_eq!(log.claim(9), Err(Refused::Unknown));
    }

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
