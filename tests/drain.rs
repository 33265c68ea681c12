//! Graceful drain of a real `ttarag serve` process: SIGTERM stops new work (503, `/health`
//! draining), lets the request in flight finish, then exits 0; past the drain deadline it exits
//! anyway. The real default model makes a request long enough to be caught in flight.

mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Server {
    child: common::KillOnDrop,
    base: String,
    _dir: tempfile::TempDir,
}

fn serve(drain_timeout_ms: u64) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let config = common::facts_config(
        dir.path(),
        &format!("[server]\ndrain_timeout_ms = {drain_timeout_ms}\n"),
    );
    let (child, base) = common::spawn_serve(&[
        "--config".as_ref(),
        config.as_os_str(),
        "--model".as_ref(),
        common::default_model_path().as_os_str(),
        "--index-dir".as_ref(),
        dir.path().join("index").as_os_str(),
    ]);
    Server {
        child: common::KillOnDrop(child),
        base,
        _dir: dir,
    }
}

/// A request whose prefill alone takes seconds on the CPU.
fn long_request() -> Value {
    let words = "the quick brown fox jumps over the lazy dog near the river bank ".repeat(120);
    json!({"messages": [{"role": "user", "content": words}], "max_tokens": 1,
           "temperature": 0, "rag": {"mode": "none"}})
}

fn sigterm(child: &Child) {
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
}

async fn health(base: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}/health")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

/// Waits (bounded) until the server reports `n` requests in flight.
async fn until_in_flight(base: &str, n: u64) {
    for _ in 0..200 {
        if health(base).await.1["in_flight"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never saw {n} requests in flight");
}

/// Waits (bounded: 60 s) for the process to exit and returns its status.
fn exit_status(child: &mut Child) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_refuses_new_work_and_exits_zero() {
    let mut s = serve(60_000);
    let (st, h) = health(&s.base).await;
    assert_eq!((st, h["status"].as_str()), (200, Some("ok")), "{h}");

    let url = format!("{}/v1/chat/completions", s.base);
    let in_flight = tokio::spawn({
        let url = url.clone();
        async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&long_request())
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    until_in_flight(&s.base, 1).await;
    sigterm(&s.child.0);

    // Draining: health says so with 503, new requests get 503 with Retry-After.
    let mut saw_draining = false;
    for _ in 0..100 {
        let (st, h) = health(&s.base).await;
        if h["status"] == "draining" {
            assert_eq!(st, 503, "{h}");
            saw_draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_draining, "health never said draining");
    let r = reqwest::Client::new()
        .post(&url)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "draining", "{v}");

    // The request in flight still gets its whole answer, then the process exits cleanly.
    let (st, v) = in_flight.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 1, "{v}");
    let status = exit_status(&mut s.child.0);
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_drain_deadline_the_process_exits_anyway() {
    let mut s = serve(100);
    let url = format!("{}/v1/chat/completions", s.base);
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&long_request())
            .send()
            .await
    });
    until_in_flight(&s.base, 1).await;
    sigterm(&s.child.0);
    let status = exit_status(&mut s.child.0);
    assert!(status.success(), "exit status {status}");
    // The client saw its connection end rather than an answer.
    let r = in_flight.await.unwrap();
    assert!(
        r.is_err() || !r.unwrap().status().is_success(),
        "no answer after exit"
    );
}
