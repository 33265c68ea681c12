//! API keys, the admin key and per-key concurrency, over real loopback connections on the tiny
//! random-weight model; and `ttarag serve`'s warning for an open server on a public address.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{start_tiny, start_tiny_toml};
use futures::StreamExt;
use serde_json::{json, Value};

const KEY: &str = "sk-test-user-0123456789";
const OTHER: &str = "sk-test-other-0123456789";
const ADMIN: &str = "sk-test-admin-0123456789";
const WRONG: &str = "sk-test-wrong-0123456789";

/// Two ordinary keys and an admin key, then `extra` lines of `[auth]`.
fn keyed(extra: &str) -> String {
    format!("[auth]\napi_keys = [\" {KEY} \", \"{OTHER}\"]\nadmin_key = \"{ADMIN}\"\n{extra}\n")
}

fn ask(max_tokens: u32) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "What can damage buildings?"}],
           "max_tokens": max_tokens, "temperature": 0, "seed": 1})
}

fn full_scope() -> Value {
    let mut body = ask(4);
    body["rag"] = json!({"mode": "tta", "tta": {"scope": "full", "steps": 1, "min_words": 4}});
    body
}

/// `auth` is an `Authorization` header value; `body` makes it a POST.
async fn send(
    base: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<&Value>,
) -> reqwest::Response {
    let c = reqwest::Client::new();
    let mut r = match body {
        Some(b) => c.post(format!("{base}{path}")).json(b),
        None => c.get(format!("{base}{path}")),
    };
    if let Some(a) = auth {
        r = r.header("authorization", a);
    }
    r.send().await.unwrap()
}

/// A chat completion with `Bearer key` (none when `key` is `None`): status, headers, JSON.
async fn chat(
    base: &str,
    key: Option<&str>,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let r = send(base, "/v1/chat/completions", auth.as_deref(), Some(body)).await;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap())
}

fn assert_error(v: &Value, kind: &str, code: &str) {
    let e = &v["error"];
    assert!(!e["message"].as_str().unwrap().is_empty(), "{v}");
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["code"], code, "{v}");
    assert!(e.as_object().unwrap().contains_key("param"), "{v}");
}

#[tokio::test]
async fn keys_guard_every_route_but_the_probes() {
    let s = start_tiny_toml(1, 8, false, &keyed("")).await;
    let base = &s.base;

    let (st, h, v) = chat(base, None, &ask(2)).await;
    assert_eq!(st, 401, "{v}");
    assert_error(&v, "invalid_request_error", "invalid_api_key");
    assert!(h["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));

    let (st, h, v) = chat(base, Some(WRONG), &ask(2)).await;
    assert_eq!(st, 401, "{v}");
    assert_error(&v, "invalid_request_error", "invalid_api_key");
    let challenge = h["www-authenticate"].to_str().unwrap();
    assert!(challenge.starts_with("Bearer") && challenge.contains("invalid_token"));
    assert!(
        !v.to_string().contains(WRONG),
        "the presented key is not echoed: {v}"
    );
    // A key differing only in a suffix, and another scheme, are refused too.
    let (st, _, _) = chat(base, Some(&format!("{KEY}x")), &ask(2)).await;
    assert_eq!(st, 401);
    let r = send(base, "/v1/models", Some(&format!("Basic {KEY}")), None).await;
    assert_eq!(r.status(), 401);

    for key in [KEY, OTHER, ADMIN] {
        let (st, _, v) = chat(base, Some(key), &ask(2)).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
    }
    // Scheme case and surrounding spaces do not matter.
    let r = send(base, "/v1/models", Some(&format!("bearer   {KEY}  ")), None).await;
    assert_eq!(r.status(), 200);

    let bearer = format!("Bearer {KEY}");
    for path in ["/v1/models", "/metrics", "/v1/ab/summary", "/nope"] {
        let r = send(base, path, None, None).await;
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers().contains_key("www-authenticate"), "{path}");
        let r = send(base, path, Some(&bearer), None).await;
        let want = if path == "/nope" { 404 } else { 200 };
        assert_eq!(r.status(), want, "{path}");
    }
    let r = send(base, "/v1/feedback", None, Some(&json!({"id": "x"}))).await;
    assert_eq!(r.status(), 401);

    // The probes answer without a key, and with a wrong one.
    for auth in [None, Some(format!("Bearer {WRONG}"))] {
        let r = send(base, "/health", auth.as_deref(), None).await;
        assert_eq!(r.status(), 200);
        let r = send(base, "/ready", auth.as_deref(), None).await;
        assert_ne!(r.status(), 401);
    }
}

#[tokio::test]
async fn without_keys_the_server_stays_open() {
    let s = start_tiny(1, 8, false).await;
    // OpenAI's clients always send some key.
    for key in [None, Some("unused")] {
        let (st, _, v) = chat(&s.base, key, &ask(2)).await;
        assert_eq!(st, 200, "{v}");
    }
    let r = send(&s.base, "/metrics", None, None).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn explicit_full_scope_needs_the_admin_key() {
    let s = start_tiny_toml(1, 8, false, &keyed("")).await;
    let (st, _, v) = chat(&s.base, Some(KEY), &full_scope()).await;
    assert_eq!(st, 403, "{v}");
    assert_error(&v, "invalid_request_error", "permission_denied");
    assert_eq!(v["error"]["param"], "rag.tta.scope");
    let (st, _, v) = chat(&s.base, Some(ADMIN), &full_scope()).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rag"]["tta"]["scope"], "full");
    // LoRA is anyone's.
    let mut lora = full_scope();
    lora["rag"]["tta"]["scope"] = json!("lora");
    let (st, _, v) = chat(&s.base, Some(KEY), &lora).await;
    assert_eq!(st, 200, "{v}");

    // An open server refuses explicit full scope to everyone...
    let open = start_tiny(1, 8, false).await;
    let (st, _, v) = chat(&open.base, None, &full_scope()).await;
    assert_eq!(st, 403, "{v}");
    assert_error(&v, "invalid_request_error", "permission_denied");
    // ...unless full_scope = "any".
    let any = start_tiny_toml(1, 8, false, &keyed("full_scope = \"any\"")).await;
    let (st, _, v) = chat(&any.base, Some(KEY), &full_scope()).await;
    assert_eq!(st, 200, "{v}");

    // Full scope as the operator's default is not the client's request.
    let toml = format!("{}[tta]\nscope = \"full\"\n", keyed(""));
    let default_full = start_tiny_toml(1, 8, false, &toml).await;
    let mut body = full_scope();
    body["rag"]["tta"] = json!({"steps": 1, "min_words": 4});
    let (st, _, v) = chat(&default_full.base, Some(KEY), &body).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rag"]["tta"]["scope"], "full");
}

/// Everything `ttarag=trace` logs in this test binary.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("ttarag=trace"))
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .init();
        buf
    })
    .clone()
}

#[tokio::test]
async fn keys_never_reach_logs_debug_output_or_errors() {
    let logs = captured_logs();
    let toml = keyed("");
    let s = start_tiny_toml(1, 8, false, &toml).await;
    chat(&s.base, None, &ask(2)).await;
    chat(&s.base, Some(WRONG), &ask(2)).await;
    chat(&s.base, Some(KEY), &ask(2)).await;
    chat(&s.base, Some(KEY), &full_scope()).await;
    chat(&s.base, Some(ADMIN), &full_scope()).await;

    let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
    // The log saw these requests (by key position), so its silence on the keys means something.
    for seen in [
        "refused: no API key",
        "refused: unknown API key",
        "key=key0",
        "key=admin",
    ] {
        assert!(text.contains(seen), "{seen} not logged:\n{text}");
    }
    let cfg = ttarag::config::Config::from_toml(&toml).unwrap();
    let debug = format!("{cfg:?}\n{:#?}", cfg.auth);
    assert!(debug.contains("***"), "{debug}");
    for key in [KEY, OTHER, ADMIN, WRONG] {
        assert!(!text.contains(key), "{key} in the logs:\n{text}");
        assert!(!debug.contains(key), "{key} in Debug output:\n{debug}");
    }
}

#[tokio::test]
async fn a_key_over_its_concurrency_limit_gets_429_until_its_request_ends() {
    let s = start_tiny_toml(2, 8, true, &keyed("max_concurrent_per_key = 1")).await;
    let base = &s.base;
    let client = reqwest::Client::new();
    let streamed = |max_tokens| {
        let mut body = ask(max_tokens);
        body["stream"] = json!(true);
        client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
    };

    // Without a stop token the tiny model's stream runs to its context: hundreds of tokens.
    let running = streamed(2048).send().await.unwrap();
    assert_eq!(running.status(), 200);
    let (st, h, v) = chat(base, Some(KEY), &ask(2)).await;
    assert_eq!(st, 429, "{v}");
    assert_error(&v, "rate_limit_error", "concurrency_limit_exceeded");
    let secs: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(secs >= 1);
    // Other keys, and the key's requests that run no model, are not held up.
    let (st, _, v) = chat(base, Some(OTHER), &ask(2)).await;
    assert_eq!(st, 200, "{v}");
    let r = send(base, "/v1/models", Some(&format!("Bearer {KEY}")), None).await;
    assert_eq!(r.status(), 200);

    // The client hangs up mid-stream: the slot comes back.
    let mut body = running.bytes_stream();
    body.next().await.unwrap().unwrap();
    drop(body);
    let t = Instant::now();
    loop {
        let (st, _, v) = chat(base, Some(KEY), &ask(2)).await;
        if st == 200 {
            break;
        }
        assert_eq!(st, 429, "{v}");
        assert!(t.elapsed() < Duration::from_secs(20), "slot never returned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Each finished request, plain or streamed to its end, hands its slot on at once.
    for _ in 0..3 {
        let (st, _, v) = chat(base, Some(KEY), &ask(8)).await;
        assert_eq!(st, 200, "{v}");
    }
    let text = streamed(8).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("[DONE]"), "{text}");
    let (st, h, v) = chat(base, Some(KEY), &ask(2)).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        h.contains_key("content-length"),
        "a plain answer keeps its length: {h:?}"
    );
}

#[tokio::test]
async fn an_open_server_does_not_limit_per_client() {
    let s = start_tiny_toml(2, 8, true, "[auth]\nmax_concurrent_per_key = 1\n").await;
    let mut body = ask(2048);
    body["stream"] = json!(true);
    let running = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 200);
    let (st, _, v) = chat(&s.base, None, &ask(2)).await;
    assert_eq!(st, 200, "{v}");
    drop(running);
}

/// `ttarag serve` on `host` with `env`, over a model file that does not exist: it stops right
/// after the checks that come before loading. Its stderr, and whether it failed.
fn serve_stderr(host: &str, env: &[(&str, &str)]) -> (String, bool) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ttarag"))
        .current_dir(dir.path())
        .env_clear()
        .envs(env.iter().copied())
        .args([
            "--model",
            "missing.gguf",
            "serve",
            "--host",
            host,
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn serving_a_public_address_without_keys_warns() {
    let (err, ok) = serve_stderr("0.0.0.0", &[]);
    assert!(!ok);
    assert!(
        err.contains("WARNING") && err.contains("no API key"),
        "{err}"
    );
    assert!(
        err.contains("not found"),
        "it went on to load the model: {err}"
    );
    for (host, env) in [
        ("0.0.0.0", vec![("TTARAG_API_KEYS", KEY)]),
        ("0.0.0.0", vec![("TTARAG_ADMIN_KEY", ADMIN)]),
        ("127.0.0.1", vec![]),
        ("localhost", vec![]),
    ] {
        let (err, _) = serve_stderr(host, &env);
        assert!(!err.contains("WARNING"), "{host} {env:?}: {err}");
        assert!(err.contains("not found"), "{err}");
    }
    // A key variable that holds no key, or a bad key, stops the server before it serves.
    let (err, ok) = serve_stderr("0.0.0.0", &[("TTARAG_API_KEYS", " , ")]);
    assert!(!ok && err.contains("TTARAG_API_KEYS"), "{err}");
    let (err, ok) = serve_stderr("127.0.0.1", &[("TTARAG_API_KEYS", "tiny-secret")]);
    assert!(!ok && err.contains("auth.api_keys[0]"), "{err}");
    assert!(!err.contains("tiny-secret"), "{err}");
}
