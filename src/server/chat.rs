//! `POST /v1/chat/completions`, plain and streamed (SSE).

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;

use crate::engine::{ChatJob, Completion, EngineError, Event, Ticket};

use super::auth::Principal;
use super::error::ApiError;
use super::experiment::{End, Stored};
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

/// Where one request is: what the metrics and the A/B arm need at its end. It counts the
/// request as in flight while it lives, and a request dropped before it finished (its client
/// hung up) is recorded as cancelled, so every request ends accounted for.
struct Outcome {
    app: Arc<App>,
    mode: &'static str,
    start: Instant,
    /// The response id's uuid (`chatcmpl-<uuid>`), known from the start for A/B bookkeeping.
    id: uuid::Uuid,
    /// The A/B arm serving the request, if any.
    arm: Option<usize>,
    first_token_seen: bool,
    finished: bool,
    /// Resolves once the shared A/B store has the record (see [`Outcome::stored`]).
    stored: Option<Stored>,
}

impl Outcome {
    fn new(app: Arc<App>) -> Self {
        app.in_flight.fetch_add(1, Ordering::SeqCst);
        Self {
            app,
            mode: "unknown",
            start: Instant::now(),
            id: uuid::Uuid::new_v4(),
            arm: None,
            first_token_seen: false,
            finished: false,
            stored: None,
        }
    }

    fn first_token(&mut self) {
        if std::mem::replace(&mut self.first_token_seen, true) {
            return;
        }
        self.app
            .metrics
            .ttft
            .with_label_values(&[self.mode])
            .observe(self.start.elapsed().as_secs_f64());
    }

    fn finish(&mut self, end: End, done: Option<&Completion>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let m = &self.app.metrics;
        let secs = self.start.elapsed().as_secs_f64();
        if let Some(arm) = self.arm {
            let report = done.map(|c| &c.rag);
            self.stored = self
                .app
                .ab
                .finish(m, arm, self.id.as_u128(), end, secs, report);
        }
        m.requests
            .with_label_values(&[self.mode, &end.label()])
            .inc();
        m.latency.with_label_values(&[self.mode]).observe(secs);
        if let Some(g) = done.and_then(|c| c.rag.gate.as_ref()) {
            m.gate_decisions
                .with_label_values(&[g.decision.as_str()])
                .inc();
            m.gate_seconds.observe(g.gate_ms / 1e3);
        }
        if let Some(g) = done.and_then(|c| c.rag.adapt_gate.as_ref()) {
            m.adapt_gate_decisions
                .with_label_values(&[g.action()])
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

impl Outcome {
    /// Waits (up to `[ab] write_wait_ms`) until the shared A/B store holds this request's
    /// record, so feedback sent the moment the answer arrives, to any replica, finds it.
    async fn stored(&mut self) {
        if let Some(rx) = self.stored.take() {
            if tokio::time::timeout(self.app.ab.write_wait(), rx)
                .await
                .is_err()
            {
                tracing::warn!(id = %self.id.simple(), "A/B record not yet stored; answering anyway");
            }
        }
    }
}

impl Drop for Outcome {
    fn drop(&mut self) {
        if !self.finished {
            tracing::info!(id = %self.id.simple(), mode = self.mode, "client went away; request cancelled");
            self.finish(End::Cancelled, None);
        }
        self.app.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

pub async fn chat_completions(
    State(app): State<Arc<App>>,
    caller: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    // Without the middleware (never in the router) the caller is anonymous: granted nothing.
    let caller = caller.map(|Extension(p)| p).unwrap_or_default();
    let mut outcome = Outcome::new(app.clone());
    if app.draining() {
        let e = ApiError::server(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down; retry on another replica",
        )
        .with_code("draining")
        .with_retry_after(1);
        outcome.finish(End::Status(e.status), None);
        return e.into_response();
    }
    let session = headers.get(SESSION_HEADER).map(|v| v.as_bytes().to_vec());
    match handle(&app, &caller, body, session.as_deref(), &mut outcome).await {
        Ok(Answer::Json(resp)) => resp,
        Ok(Answer::Stream(ticket, include_usage, arm_name, cite)) => {
            stream(&app, ticket, outcome, include_usage, arm_name, cite)
        }
        Err(e) => {
            outcome.finish(End::Status(e.status), None);
            e.into_response()
        }
    }
}

/// How an accepted request is answered.
enum Answer {
    Json(Response),
    /// The job's events, whether to send usage, the A/B arm's name, whether it cites.
    Stream(Ticket, bool, Option<String>, bool),
}

/// Gives the worker a moment past the deadline to answer 504 itself (it checks between steps)
/// before the handler gives up on it.
const DEADLINE_GRACE: Duration = Duration::from_secs(2);

/// When a request must be answered by, and that bound in milliseconds (for the message).
type Deadline = Option<(tokio::time::Instant, u64)>;

fn deadline_from(app: &App, start: tokio::time::Instant) -> Deadline {
    app.request_timeout()
        .map(|t| (start + t, t.as_millis() as u64))
}

/// The job's next event, or a 504 when the worker has not answered by the deadline.
async fn next_event(ticket: &mut Ticket, deadline: Deadline) -> Event {
    let ev = match deadline {
        None => ticket.recv().await,
        Some((at, ms)) => match tokio::time::timeout_at(at + DEADLINE_GRACE, ticket.recv()).await {
            Ok(ev) => ev,
            Err(_) => {
                // Dropping the ticket after this cancels the job at its next check.
                tracing::warn!(deadline_ms = ms, "the worker missed the request's deadline");
                return Event::Error(EngineError::DeadlineExceeded(ms));
            }
        },
    };
    ev.unwrap_or_else(|| Event::Error(EngineError::Internal("the model worker stopped".into())))
}

async fn handle(
    app: &Arc<App>,
    caller: &Principal,
    body: Result<Bytes, BytesRejection>,
    session: Option<&[u8]>,
    outcome: &mut Outcome,
) -> Result<Answer, ApiError> {
    let received = tokio::time::Instant::now();
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
    let asked_full = super::auth::asks_full(req.rag.as_ref().and_then(|r| r.tta.as_ref()));
    let (job, arm) = to_job(
        req,
        &app.config,
        &app.engine.collections,
        &app.ab.arms,
        session.filter(|s| !s.is_empty()),
    )?;
    super::auth::check_scope(caller, asked_full, &app.config.auth)?;
    outcome.mode = if job.rag.gate.is_some() {
        "auto"
    } else {
        job.rag.mode.as_str()
    };
    outcome.arm = arm;
    check_prompt_length(app, &job).await?;
    let arm_name = arm.and_then(|i| app.ab.arms.get(i)).map(|a| a.name.clone());
    let cite = job.rag.cite;
    let mut ticket = app.engine.submit(job)?;
    app.metrics.queue_depth.set(app.engine.queue_depth() as i64);
    if stream {
        return Ok(Answer::Stream(ticket, include_usage, arm_name, cite));
    }
    let deadline = deadline_from(app, received);
    loop {
        match next_event(&mut ticket, deadline).await {
            Event::Text(_) => outcome.first_token(),
            Event::Error(e) => return Err(e.into()),
            Event::Done(c) => {
                outcome.finish(End::Status(StatusCode::OK), Some(&c));
                outcome.stored().await;
                let body = ChatCompletion {
                    id: format!("chatcmpl-{}", outcome.id.simple()),
                    object: "chat.completion",
                    created: now_secs(),
                    model: app.engine.model.id.clone(),
                    choices: vec![Choice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: c.text.clone(),
                        },
                        finish_reason: finish_reason(&c).unwrap_or_default(),
                        logprobs: None,
                    }],
                    usage: usage(&c),
                    rag: rag_out(&c, arm_name, cite),
                };
                return Ok(Answer::Json(Json(body).into_response()));
            }
        }
    }
}

/// Refuses, before the job is accepted, a conversation that alone is over the prompt limit
/// (passages only add to it). Tokenizing is CPU work: off the async threads.
async fn check_prompt_length(app: &Arc<App>, job: &ChatJob) -> Result<(), ApiError> {
    let engine = app.engine.clone();
    let messages = job.messages.clone();
    let tokens = tokio::task::spawn_blocking(move || engine.conversation_tokens(&messages))
        .await
        .map_err(|e| ApiError::from(EngineError::Internal(format!("tokenizing: {e}"))))??;
    let limit = app.engine.prompt_limit();
    if tokens > limit {
        return Err(ApiError::invalid(
            format!("the messages are {tokens} tokens, over this server's prompt limit of {limit}"),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    Ok(())
}

/// The response's `rag` block: the engine's report, the A/B arm, and with `rag.cite` what the
/// answer cites.
fn rag_out(c: &Completion, arm: Option<String>, cite: bool) -> RagOut {
    RagOut {
        report: c.rag.clone(),
        arm,
        citations: cite.then(|| super::citations::cited(&c.text, &c.rag.passages)),
    }
}

fn finish_reason(c: &Completion) -> Option<String> {
    serde_json::to_value(c.finish_reason)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
}

/// State of one SSE answer: the job's events and its bookkeeping, dropped with the response
/// body, which cancels the job (the client went away) and records it as cancelled.
struct StreamState {
    ticket: Ticket,
    outcome: Outcome,
    deadline: Deadline,
    include_usage: bool,
    arm: Option<String>,
    cite: bool,
    id: String,
    created: u64,
    model: String,
    ended: bool,
}

impl StreamState {
    fn chunk(&self, delta: Delta, finish: Option<String>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish,
                logprobs: None,
            }],
            usage: None,
            rag: None,
        }
    }

    /// The frames for one engine event.
    fn frames(&mut self, ev: Event) -> Vec<SseEvent> {
        match ev {
            Event::Text(t) => {
                self.outcome.first_token();
                let delta = Delta {
                    role: None,
                    content: Some(t),
                };
                vec![data(&self.chunk(delta, None))]
            }
            Event::Done(c) => {
                self.ended = true;
                self.outcome.finish(End::Status(StatusCode::OK), Some(&c));
                let mut last = self.chunk(Delta::default(), finish_reason(&c));
                let mut frames = vec![];
                if self.include_usage {
                    frames.push(data(&last));
                    last = self.chunk(Delta::default(), None);
                    last.choices.clear();
                    last.usage = Some(usage(&c));
                }
                last.rag = Some(rag_out(&c, self.arm.clone(), self.cite));
                frames.push(data(&last));
                frames.push(SseEvent::default().data("[DONE]"));
                frames
            }
            Event::Error(e) => {
                self.ended = true;
                let api = ApiError::from(e);
                self.outcome.finish(End::Status(api.status), None);
                vec![
                    SseEvent::default()
                        .json_data(api.body())
                        .unwrap_or_default(),
                    SseEvent::default().data("[DONE]"),
                ]
            }
        }
    }
}

fn data(v: &ChatCompletionChunk) -> SseEvent {
    SseEvent::default().json_data(v).unwrap_or_default()
}

/// Answers an accepted streamed request at once: headers and the `role` chunk go out now,
/// comment keep-alives while the job has no text (queued, adapting), then its text; an error
/// found later becomes an OpenAI error frame followed by `[DONE]`.
fn stream(
    app: &Arc<App>,
    ticket: Ticket,
    outcome: Outcome,
    include_usage: bool,
    arm: Option<String>,
    cite: bool,
) -> Response {
    let deadline = deadline_from(app, tokio::time::Instant::from_std(outcome.start));
    let st = StreamState {
        ticket,
        id: format!("chatcmpl-{}", outcome.id.simple()),
        outcome,
        deadline,
        include_usage,
        arm,
        cite,
        created: now_secs(),
        model: app.engine.model.id.clone(),
        ended: false,
    };
    let head = data(&st.chunk(
        Delta {
            role: Some("assistant"),
            content: Some(String::new()),
        },
        None,
    ));
    let events = futures::stream::unfold(st, |mut st| async move {
        if st.ended {
            return None;
        }
        let ev = next_event(&mut st.ticket, st.deadline).await;
        let frames = st.frames(ev);
        // The last frames name the arm and close the answer: the record goes first.
        st.outcome.stored().await;
        Some((futures::stream::iter(frames), st))
    })
    .flatten()
    .map(Ok::<_, Infallible>);
    let body = futures::stream::iter([Ok(head)]).chain(events);
    let every = Duration::from_millis(app.config.server.sse_keepalive_ms);
    Sse::new(body)
        .keep_alive(KeepAlive::new().interval(every))
        .into_response()
}
