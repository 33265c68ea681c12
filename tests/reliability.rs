//! What no client can do to the server: panic it, leave work running after hanging up, hold
//! a stream silent, or slip past its limits. Over real loopback connections, on the tiny model.

mod common;

use std::time::Duration;

use common::{post, start_tiny, start_tiny_slow, PANIC_MARKER};
use futures::StreamExt;
use serde_json::{json, Value};
use ttarag::config::Config;

fn ask(q: &str, max_tokens: u64) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": q}],
           "max_tokens": max_tokens, "temperature": 0, "seed": 1})
}

fn streamed(q: &str, max_tokens: u64) -> Value {
    let mut b = ask(q, max_tokens);
    b["stream"] = json!(true);
    b
}

async fn get(base: &str, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The value of one Prometheus sample (`name{labels}` exactly as rendered), 0 when absent.
async fn metric(base: &str, sample: &str) -> f64 {
    let (_, text) = get(base, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `metric` until it reaches `want` (bounded: 20 s), returning the last value seen.
async fn wait_metric(base: &str, sample: &str, want: f64) -> f64 {
    let mut v = 0.0;
    for _ in 0..400 {
        v = metric(base, sample).await;
        if v >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    v
}

/// A whole SSE body: its `data:` payloads and how many comment lines (keep-alives) it had.
async fn read_sse(r: reqwest::Response) -> (Vec<String>, usize) {
    let mut text = String::new();
    let mut s = r.bytes_stream();
    while let Some(b) = s.next().await {
        text.push_str(&String::from_utf8_lossy(&b.unwrap()));
    }
    let data = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect();
    let comments = text.lines().filter(|l| l.starts_with(':')).count();
    (data, comments)
}

async fn send(base: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_panicking_job_answers_500_and_its_worker_is_replaced() {
    let s = start_tiny(1, 8, false).await;
    let (st, v) = post(&s.base, &ask(PANIC_MARKER, 4)).await;
    assert_eq!(st, 500, "{v}");
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert_eq!(v["error"]["code"], "internal_error", "{v}");
    // The cause is logged, not handed to the client.
    assert!(!v["error"]["message"].as_str().unwrap().contains("injected"));

    // Streamed: the stream had begun, so the error is a frame, then [DONE].
    let r = send(&s.base, &streamed(PANIC_MARKER, 4)).await;
    assert_eq!(r.status(), 200);
    let (data, _) = read_sse(r).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "internal_error", "{err}");

    // The replacement worker serves on, over the same thread pool the panic went through.
    for q in ["What can damage buildings?", "Plants need what?"] {
        let (st, v) = post(&s.base, &ask(q, 8)).await;
        assert_eq!(st, 200, "{v}");
        assert!(!v["rag"]["passages"].as_array().unwrap().is_empty(), "{v}");
    }
    let (st, body) = get(&s.base, "/health").await;
    assert_eq!(st, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (h["status"].as_str(), h["workers_alive"].as_u64()),
        (Some("ok"), Some(1))
    );
    assert_eq!(h["worker_panics"], 2, "{h}");
    assert_eq!(metric(&s.base, "ttarag_worker_panics_total").await, 2.0);
    assert_eq!(metric(&s.base, "ttarag_workers_alive").await, 1.0);
    assert_eq!(
        metric(
            &s.base,
            "ttarag_requests_total{mode=\"static\",status=\"500\"}"
        )
        .await,
        2.0
    );
    let (st, _) = get(&s.base, "/ready").await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn a_client_that_hangs_up_frees_its_worker_and_is_counted() {
    // Each piece of text takes 10 ms: 400 tokens would hold the only worker for 4 s.
    let s = start_tiny_slow(
        1,
        8,
        true,
        Config::default(),
        Some(Duration::from_millis(10)),
    )
    .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = client
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&ask("hang up on me", 400))
        .send()
        .await;
    assert!(r.is_err(), "the client gives up first");
    let cancelled = "ttarag_requests_total{mode=\"static\",status=\"cancelled\"}";
    assert_eq!(wait_metric(&s.base, cancelled, 1.0).await, 1.0);
    // The worker stopped that job within a token (it did not run it to the end).
    assert_eq!(
        wait_metric(&s.base, "ttarag_jobs_cancelled_total", 1.0).await,
        1.0
    );

    // Streamed: read the first frame, then hang up.
    let r = send(&s.base, &streamed("hang up mid-stream", 400)).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("\"role\":\"assistant\""));
    drop(body);
    let streamed_cancel = wait_metric(&s.base, cancelled, 2.0).await;
    assert_eq!(streamed_cancel, 2.0);
    assert_eq!(
        wait_metric(&s.base, "ttarag_jobs_cancelled_total", 2.0).await,
        2.0
    );

    // The freed worker answers the next request in full.
    let (st, v) = post(&s.base, &ask("still there?", 5)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 5);
    let (_, body) = get(&s.base, "/health").await;
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["in_flight"], 0, "{h}");
}

#[tokio::test]
async fn past_its_deadline_a_request_answers_504_plain_or_streamed() {
    let mut cfg = Config::default();
    cfg.server.request_timeout_ms = 300;
    let s = start_tiny_slow(1, 8, true, cfg, Some(Duration::from_millis(10))).await;
    let (st, v) = post(&s.base, &ask("take your time", 400)).await;
    assert_eq!(st, 504, "{v}");
    assert_eq!(v["error"]["code"], "timeout", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("300 ms"),
        "{v}"
    );

    let r = send(&s.base, &streamed("take your time", 400)).await;
    assert_eq!(r.status(), 200);
    let (data, _) = read_sse(r).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(err["error"]["code"], "timeout", "{err}");
    assert_eq!(
        metric(
            &s.base,
            "ttarag_requests_total{mode=\"static\",status=\"504\"}"
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn a_stream_starts_at_once_and_keeps_alive_while_it_waits() {
    let mut cfg = Config::default();
    cfg.server.sse_keepalive_ms = 50;
    cfg.server.max_running = 1;
    let s = start_tiny_slow(1, 8, true, cfg, Some(Duration::from_millis(5))).await;
    // The scheduler, allowed one answer at a time, is busy with this one for ~1 s.
    let base = s.base.clone();
    let busy = tokio::spawn(async move { post(&base, &ask("keep the worker busy", 200)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    let r = send(&s.base, &streamed("queued behind it", 3)).await;
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = String::from_utf8_lossy(&body.next().await.unwrap().unwrap()).to_string();
    assert!(first.contains("\"role\":\"assistant\""), "{first}");
    assert!(
        !busy.is_finished(),
        "headers and the role chunk came while the job was still queued"
    );
    let mut rest = first;
    while let Some(b) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(&b.unwrap()));
    }
    let comments = rest.lines().filter(|l| l.starts_with(':')).count();
    assert!(comments >= 2, "keep-alives while queued:\n{rest}");
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    let (st, _) = busy.await.unwrap();
    assert_eq!(st, 200);
}

#[tokio::test]
async fn overload_and_retryable_refusals_carry_retry_after() {
    let mut cfg = Config::default();
    cfg.server.max_running = 1;
    let s = start_tiny_slow(1, 1, true, cfg, Some(Duration::from_millis(5))).await;
    // One answer generating, one held by the worker until the scheduler has room, one in
    // the queue (capacity 1): the next is refused at once.
    let base = s.base.clone();
    let running = tokio::spawn(async move { post(&base, &ask("one", 200)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let base = s.base.clone();
    let held = tokio::spawn(async move { post(&base, &ask("two", 2)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let base = s.base.clone();
    let queued = tokio::spawn(async move { post(&base, &ask("three", 2)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = send(&s.base, &ask("four", 2)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "overloaded", "{v}");
    assert_eq!(running.await.unwrap().0, 200);
    assert_eq!(held.await.unwrap().0, 200);
    assert_eq!(queued.await.unwrap().0, 200);
}

#[tokio::test]
async fn requests_that_change_meaning_are_refused_by_name() {
    let s = start_tiny(1, 8, false).await;
    let msg = json!([{"role": "user", "content": "q"}]);
    let with = |k: &str, v: Value| {
        let mut b = json!({"messages": msg, "max_tokens": 2});
        b[k] = v;
        b
    };
    let cases = [
        (
            json!({"messages": [{"role": "user"}]}),
            "messages[0].content",
        ),
        (
            json!({"messages": [{"role": "system", "content": null}, {"role": "user", "content": "q"}]}),
            "messages[0].content",
        ),
        (
            with(
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            "tools",
        ),
        (with("tool_choice", json!("required")), "tool_choice"),
        (
            with("response_format", json!({"type": "json_object"})),
            "response_format",
        ),
        (with("logprobs", json!(true)), "logprobs"),
        (with("top_logprobs", json!(3)), "top_logprobs"),
        (with("logit_bias", json!({"50": 100})), "logit_bias"),
        (with("n", json!(3)), "n"),
        (with("stop", json!(["x".repeat(300)])), "stop"),
        (with("stop", json!([""])), "stop"),
    ];
    for (body, param) in cases {
        let (st, v) = post(&s.base, &body).await;
        assert_eq!(st, 400, "{body} -> {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
        assert!(v["error"]["message"].is_string());
    }
    // What is harmless is still accepted: an assistant turn without content, text format,
    // tools set to nothing, logprobs false.
    let ok = json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"},
                                 {"role": "user", "content": "b"}],
                    "max_tokens": 2, "response_format": {"type": "text"}, "tools": [],
                    "tool_choice": "none", "logprobs": false});
    let (st, v) = post(&s.base, &ok).await;
    assert_eq!(st, 200, "{v}");
}

#[tokio::test]
async fn a_prompt_over_the_configured_limit_is_refused_before_it_is_accepted() {
    let mut cfg = Config::default();
    cfg.server.max_prompt_tokens = 64;
    let s = start_tiny(1, 8, false).await;
    // 40 bytes of question: under the tiny model's context, and under 64 tokens without
    // passages, but not with them (the limit covers the whole prompt).
    let s_limited = common::start_tiny_with(1, 8, false, cfg).await;
    let long = "tell me about the plants and buildings";
    let (st, v) = post(&s.base, &ask(long, 2)).await;
    assert_eq!(st, 200, "{v}");
    let body = json!({"messages": [{"role": "user", "content": "x".repeat(100)}], "stream": true});
    let (st, v) = post(&s_limited.base, &body).await;
    assert_eq!(st, 400, "checked before the stream starts: {v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    // Within the limit alone, over it with passages: found by the worker, after acceptance.
    let (st, v) = post(&s_limited.base, &ask(long, 2)).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("passages"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_says_ready_only_once_warmed_up_and_serves_meanwhile() {
    let s = start_tiny(1, 4, false).await;
    s.app.set_warming(true);
    let (status, body) = get(&s.base, "/ready").await;
    assert_eq!(status, 503, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "warming");
    // A load balancer holds traffic back, but a request that comes anyway is answered.
    assert_eq!(post(&s.base, &ask("hello", 2)).await.0, 200);
    let app = s.app.clone();
    let w = tokio::task::spawn_blocking(move || ttarag::server::warm_up(&app))
        .await
        .unwrap()
        .expect("the warm-up ran");
    assert!(
        w.adapt.is_some(),
        "the default scope is LoRA: one adaptation ran"
    );
    let (status, body) = get(&s.base, "/ready").await;
    assert_eq!(status, 200, "{body}");
    // Its requests went to the engine directly: no client-visible request was counted.
    let (_, text) = get(&s.base, "/metrics").await;
    let counted: f64 = text
        .lines()
        .filter(|l| l.starts_with("ttarag_requests_total{"))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, 1.0, "{text}");
}
