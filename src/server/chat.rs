//! `POST /v1/chat/completions`, plain and streamed (SSE).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::engine::{Completion, Event};

use super::error::ApiError;
use super::openai::*;
use super::validate::to_job;
use super::App;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage(c: &Completion) -> Usage {
    Usage {
        prompt_tokens: c.prompt_tokens,
        completion_tokens: c.completion_tokens,
        total_tokens: c.prompt_tokens + c.completion_tokens,
    }
}

/// Sticky A/B key for clients that do not send OpenAI's `user` field.
const SESSION_HEADER: &str = "x-session-id";

/// Where one request is: what the metrics need at its end.
struct Outcome {
    app: Arc<App>,
    mode: &'static str,
    start: Instant,
    /// The response id's uuid (`chatcmpl-<uuid>`), known from the start for A/B bookkeeping.
    id: uuid::Uuid,
    /// The A/B arm serving the request, if any.
    arm: Option<usize>,
}

impl Outcome {
    fn first_token(&self) {
        self.app
            .metrics
            .ttft
            .with_label_values(&[self.mode])
            .observe(self.start.elapsed().as_secs_f64());
    }

    fn finish(&self, status: StatusCode, done: Option<&Completion>) {
        let m = &self.app.metrics;
        if let Some(arm) = self.arm {
            self.app.ab.finish(
                m,
                arm,
                self.id.as_u128(),
                status,
                self.start.elapsed().as_secs_f64(),
                done.map(|c| &c.rag),
            );
        }
        m.requests
            .with_label_values(&[self.mode, status.as_str()])
            .inc();
        m.latency
            .with_label_values(&[self.mode])
            .observe(self.start.elapsed().as_secs_f64());
        if let Some(g) = done.and_then(|c| c.rag.gate.as_ref()) {
            m.gate_decisions
                .with_label_values(&[g.decision.as_str()])
                .inc();
            m.gate_seconds.observe(g.gate_ms / 1e3);
        }
        if let Some(c) = done {
            m.tokens
                .with_label_values(&["prompt"])
                .inc_by(c.prompt_tokens as u64);
            m.tokens
                .with_label_values(&["completion"])
                .inc_by(c.completion_tokens as u64);
        }
    }
}

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut outcome = Outcome {
        app: app.clone(),
        mode: "unknown",
        start: Instant::now(),
        id: uuid::Uuid::new_v4(),
        arm: None,
    };
    let session = headers.get(SESSION_HEADER).map(|v| v.as_bytes());
    match handle(&app, body, session, &mut outcome).await {
        Ok(resp) => resp,
        Err(e) => {
            outcome.finish(e.status, None);
            e.into_response()
        }
    }
}

async fn handle(
    app: &Arc<App>,
    body: Result<Bytes, BytesRejection>,
    session: Option<&[u8]>,
    outcome: &mut Outcome,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = super::error::json_body(body)?;
    if let Some(m) = &req.model {
        if m != &app.engine.model.id {
            return Err(ApiError::invalid(
                format!(
                    "model `{m}` does not exist; this server serves `{}`",
                    app.engine.model.id
                ),
                Some("model"),
            )
            .with_status(StatusCode::NOT_FOUND)
            .with_code("model_not_found"));
        }
    }
    let stream = req.stream.unwrap_or(false);
    let include_usage = req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let (job, arm) = to_job(
        req,
        &app.config,
        &app.engine.collections,
        &app.ab.arms,
        session.filter(|s| !s.is_empty()),
    )?;
    outcome.mode = if job.rag.gate.is_some() {
        "auto"
    } else {
        job.rag.mode.as_str()
    };
    outcome.arm = arm;
    let arm_name = arm.and_then(|i| app.ab.arms.get(i)).map(|a| a.name.clone());
    let mut rx = app.engine.submit(job)?;
    app.metrics.queue_depth.set(app.engine.queue_depth() as i64);

    let id = format!("chatcmpl-{}", outcome.id.simple());
    let created = now_secs();
    let model = app.engine.model.id.clone();

    // Wait for the first event before answering, so that errors found by the worker
    // (e.g. a prompt longer than the context) still get their proper status.
    let first = rx.recv().await.ok_or_else(|| {
        ApiError::from(crate::engine::EngineError::Internal(
            "worker stopped".into(),
        ))
    })?;
    if let Event::Error(e) = first {
        return Err(e.into());
    }
    if matches!(first, Event::Text(_)) {
        outcome.first_token();
    }

    if !stream {
        let mut ev = first;
        loop {
            match ev {
                Event::Text(_) => {}
                Event::Done(c) => {
                    outcome.finish(StatusCode::OK, Some(&c));
                    let body = ChatCompletion {
                        id,
                        object: "chat.completion",
                        created,
                        model,
                        choices: vec![Choice {
                            index: 0,
                            message: AssistantMessage {
                                role: "assistant",
                                content: c.text.clone(),
                            },
                            finish_reason: serde_json::to_value(c.finish_reason)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default(),
                            logprobs: None,
                        }],
                        usage: usage(&c),
                        rag: RagOut {
                            report: c.rag.clone(),
                            arm: arm_name,
                        },
                    };
                    return Ok(Json(body).into_response());
                }
                Event::Error(e) => return Err(e.into()),
            }
            ev = rx.recv().await.ok_or_else(|| {
                ApiError::from(crate::engine::EngineError::Internal(
                    "worker stopped".into(),
                ))
            })?;
        }
    }

    let chunk = move |delta: Delta, finish: Option<String>| ChatCompletionChunk {
        id: id.clone(),
        object: "chat.completion.chunk",
        created,
        model: model.clone(),
        choices: vec![ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish,
            logprobs: None,
        }],
        usage: None,
        rag: None,
    };
    let data = |v: &ChatCompletionChunk| SseEvent::default().json_data(v).unwrap_or_default();
    let head = data(&chunk(
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        },
        None,
    ));
    let outcome = Arc::new(outcome_take(outcome));
    let events = futures::stream::iter([first])
        .chain(UnboundedReceiverStream::new(rx))
        .flat_map(move |ev| {
            let frames: Vec<SseEvent> = match ev {
                Event::Text(t) => vec![data(&chunk(
                    Delta {
                        role: None,
                        content: Some(t),
                    },
                    None,
                ))],
                Event::Done(c) => {
                    outcome.finish(StatusCode::OK, Some(&c));
                    let reason = serde_json::to_value(c.finish_reason)
                        .ok()
                        .and_then(|v| v.as_str().map(String::from));
                    let mut last = chunk(Delta::default(), reason);
                    let mut frames = vec![];
                    if include_usage {
                        frames.push(data(&last));
                        last = chunk(Delta::default(), None);
                        last.choices.clear();
                        last.usage = Some(usage(&c));
                    }
                    last.rag = Some(RagOut {
                        report: c.rag.clone(),
                        arm: arm_name.clone(),
                    });
                    frames.push(data(&last));
                    frames.push(SseEvent::default().data("[DONE]"));
                    frames
                }
                Event::Error(e) => {
                    let api = ApiError::from(e);
                    outcome.finish(api.status, None);
                    vec![
                        SseEvent::default()
                            .json_data(api.body())
                            .unwrap_or_default(),
                        SseEvent::default().data("[DONE]"),
                    ]
                }
            };
            futures::stream::iter(frames.into_iter().map(Ok::<_, Infallible>))
        });
    let body = futures::stream::iter([Ok(head)]).chain(events);
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::default())
        .into_response())
}

fn outcome_take(o: &mut Outcome) -> Outcome {
    Outcome {
        app: o.app.clone(),
        mode: o.mode,
        start: o.start,
        id: o.id,
        arm: o.arm,
    }
}
