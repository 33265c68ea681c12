//! The HTTP API over real loopback connections, on a tiny random-weight model.

mod common;

use common::{post, start_tiny};
use futures::StreamExt;
use serde_json::{json, Value};

fn ask(q: &str) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": q}],
           "max_tokens": 16, "temperature": 0, "seed": 1})
}

/// The answer text streamed in `frames` (the payloads before `[DONE]`).
fn sse_text(frames: &[String]) -> String {
    frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str::<Value>(f).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// Reads an SSE body into its `data:` payloads.
async fn sse(base: &str, body: &Value) -> Vec<String> {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let mut text = String::new();
    let mut s = r.bytes_stream();
    while let Some(b) = s.next().await {
        text.push_str(&String::from_utf8_lossy(&b.unwrap()));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").map(String::from))
        .collect()
}

#[tokio::test]
async fn chat_completion_round_trip_reports_rag() {
    let s = start_tiny(1, 8, false).await;
    let (status, v) = post(&s.base, &ask("What can damage buildings?")).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "tiny");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());
    let fr = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(fr == "stop" || fr == "length");
    let u = &v["usage"];
    assert!(u["prompt_tokens"].as_u64().unwrap() > 20);
    assert_eq!(
        u["total_tokens"].as_u64().unwrap(),
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
    );
    assert!(u["completion_tokens"].as_u64().unwrap() <= 16);
    let rag = &v["rag"];
    assert_eq!(rag["mode"], "static");
    assert_eq!(rag["collection"], "facts");
    assert_eq!(rag["passages"][0]["id"], "f1");
    assert!(rag["passages"][0]["score"].as_f64().unwrap() > 0.0);
    assert_eq!(
        rag["passages"][0]["text"],
        "Earthquakes can damage buildings."
    );
    for k in ["retrieve", "prefill", "decode"] {
        assert!(rag["timings_ms"][k].as_f64().unwrap() >= 0.0, "{k}");
    }

    // Without retrieval: no passages and a shorter prompt.
    let mut body = ask("What can damage buildings?");
    body["rag"] = json!({"mode": "none"});
    let (status, none) = post(&s.base, &body).await;
    assert_eq!(status, 200);
    assert_eq!(none["rag"]["mode"], "none");
    assert_eq!(none["rag"]["passages"].as_array().unwrap().len(), 0);
    assert!(none["usage"]["prompt_tokens"].as_u64() < u["prompt_tokens"].as_u64());

    // top_k and text-part content are honoured.
    let body = json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "plants sunlight water"}]}],
                      "max_completion_tokens": 4, "rag": {"top_k": 2}});
    let (status, v) = post(&s.base, &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rag"]["passages"].as_array().unwrap().len(), 2);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 4);
}

#[tokio::test]
async fn streaming_matches_the_plain_answer_and_ends_with_done() {
    let s = start_tiny(1, 8, true).await;
    let (_, plain) = post(&s.base, &ask("Why do plants grow?")).await;
    let mut body = ask("Why do plants grow?");
    body["stream"] = json!(true);
    let frames = sse(&s.base, &body).await;
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let mut text = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert_eq!(
        text,
        plain["choices"][0]["message"]["content"].as_str().unwrap()
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["rag"]["passages"][0]["id"], "f2");
    assert!(last.get("usage").is_none());

    // include_usage adds a usage-only chunk, which then carries `rag`.
    body["stream_options"] = json!({"include_usage": true});
    let frames = sse(&s.base, &body).await;
    let usage: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 16);
    assert_eq!(usage["rag"]["mode"], "static");
    let finish: Value = serde_json::from_str(&frames[frames.len() - 3]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
}

#[tokio::test]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = start_tiny(1, 8, false).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", s.base);
    let raw = |body: &'static str| {
        client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
    };
    let check = |status: u16, v: &Value, want: u16, param: Option<&str>| {
        assert_eq!(status, want, "{v}");
        let e = &v["error"];
        assert!(!e["message"].as_str().unwrap().is_empty(), "{v}");
        assert!(e["type"].is_string(), "{v}");
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{v}");
        }
    };
    for body in ["{not json", "", "[1,2]", "{\"messages\": 5}"] {
        let r = raw(body).send().await.unwrap();
        let st = r.status().as_u16();
        check(st, &r.json().await.unwrap(), 400, None);
    }
    let msg = |q: &str| json!([{"role": "user", "content": q}]);
    let cases = vec![
        (json!({}), 400, Some("messages")),
        (json!({"messages": []}), 400, Some("messages")),
        (
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages"),
        ),
        (
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            Some("messages"),
        ),
        (
            json!({"messages": msg("q"), "temperature": 2.5}),
            400,
            Some("temperature"),
        ),
        (
            json!({"messages": msg("q"), "temperature": -1}),
            400,
            Some("temperature"),
        ),
        (
            json!({"messages": msg("q"), "top_p": 0}),
            400,
            Some("top_p"),
        ),
        (json!({"messages": msg("q"), "n": 2}), 400, Some("n")),
        (
            json!({"messages": msg("q"), "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": msg("q"), "max_tokens": 1_000_000}),
            400,
            Some("max_tokens"),
        ),
        (
            json!({"messages": msg("q"), "stop": ["a", "b", "c", "d", "e"]}),
            400,
            Some("stop"),
        ),
        (
            json!({"messages": msg("q"), "rag": {"collection": "nope"}}),
            400,
            Some("rag.collection"),
        ),
        (
            json!({"messages": msg("q"), "rag": {"collection": "../etc"}}),
            400,
            Some("rag.collection"),
        ),
        (
            json!({"messages": msg("q"), "rag": {"mode": "magic"}}),
            400,
            Some("rag.mode"),
        ),
        (
            json!({"messages": msg("q"), "rag": {"top_k": 0}}),
            400,
            Some("rag.top_k"),
        ),
        (
            json!({"messages": msg("q"), "rag": {"top_k": 1000}}),
            400,
            Some("rag.top_k"),
        ),
        (
            json!({"messages": msg("q"), "model": "gpt-4"}),
            404,
            Some("model"),
        ),
        (
            json!({"messages": msg(&"long question ".repeat(100)), "max_tokens": 5}),
            400,
            Some("messages"),
        ),
    ];
    for (body, want, param) in cases {
        let (st, v) = post(&s.base, &body).await;
        check(st, &v, want, param);
    }
    // A misspelt adaptation setting is refused, not silently left at its default.
    let (st, v) = post(
        &s.base,
        &json!({"messages": msg("q"), "rag": {"mode": "tta", "tta": {"lr_typo": 0.1}}}),
    )
    .await;
    check(st, &v, 400, None);
    assert!(
        v["error"]["message"].as_str().unwrap().contains("lr_typo"),
        "{v}"
    );
    // Context overflow in streaming mode is still a plain 400, not a broken stream.
    let (st, v) = post(
        &s.base,
        &json!({"stream": true, "messages": msg(&"overflow ".repeat(100))}),
    )
    .await;
    check(st, &v, 400, Some("messages"));
    assert_eq!(v["error"]["code"], "context_length_exceeded");

    // Body over the cap.
    let big = json!({"messages": msg(&"x".repeat(100_000))});
    let (st, v) = post(&s.base, &big).await;
    check(st, &v, 413, None);

    // Unknown fields are ignored.
    let (st, _) = post(&s.base, &json!({"messages": msg("q"), "max_tokens": 2, "frequency_penalty": 0.5, "user": "u1", "logit_bias": {}})).await;
    assert_eq!(st, 200);
    let r = client.get(format!("{}/nope", s.base)).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn concurrent_requests_all_complete() {
    let s = start_tiny(2, 16, true).await;
    let futs = (0..8).map(|i| {
        let base = s.base.clone();
        async move {
            let mut body = ask(&format!("question {i} about plants"));
            body["max_tokens"] = json!(24);
            post(&base, &body).await
        }
    });
    for (st, v) in futures::future::join_all(futs).await {
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 24);
    }
}

#[tokio::test]
async fn full_queue_is_refused_fast_with_429() {
    let s = start_tiny(1, 1, true).await;
    let futs = (0..10).map(|_| {
        let base = s.base.clone();
        async move {
            let mut body = ask("busy");
            body["max_tokens"] = json!(400);
            let t = std::time::Instant::now();
            let (st, v) = post(&base, &body).await;
            (st, v, t.elapsed())
        }
    });
    let results = futures::future::join_all(futs).await;
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    let served = results.iter().filter(|r| r.0 == 200).count();
    assert!(
        !refused.is_empty(),
        "one worker and one queue slot cannot take 10 requests"
    );
    assert!(served >= 1);
    assert_eq!(served + refused.len(), 10);
    for (_, v, _) in &refused {
        assert_eq!(v["error"]["type"], "rate_limit_error");
    }
    let slowest_refusal = refused.iter().map(|r| r.2).max().unwrap();
    let slowest_served = results
        .iter()
        .filter(|r| r.0 == 200)
        .map(|r| r.2)
        .max()
        .unwrap();
    assert!(
        slowest_refusal < slowest_served,
        "refusals must not wait for the queue"
    );
}

#[tokio::test]
async fn models_health_and_metrics() {
    let s = start_tiny(1, 8, false).await;
    let c = reqwest::Client::new();
    let v: Value = c
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny");
    let v: Value = c
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "ok");

    let (_, answered) = post(&s.base, &ask("plants")).await;
    post(&s.base, &json!({"messages": []})).await;
    let text = c
        .get(format!("{}/metrics", s.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("ttarag_requests_total{mode=\"static\",status=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ttarag_requests_total{mode=\"unknown\",status=\"400\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ttarag_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("ttarag_tokens_total{kind=\"prompt\"}"),
        "{text}"
    );
    // One answer alone: a decode step per token after its first, no step graph on the CPU.
    let tokens = answered["usage"]["completion_tokens"].as_u64().unwrap();
    for (series, want) in [
        ("ttarag_decode_steps_total", tokens - 1),
        ("ttarag_decode_step_graphs_total", 0),
        ("ttarag_decode_steps_rebound_total", 0),
        ("ttarag_decode_steps_replayed_total", 0),
    ] {
        assert!(
            text.contains(&format!("\n{series} {want}\n")),
            "{series}: {text}"
        );
    }
}

#[tokio::test]
async fn tta_mode_reports_its_adaptation_plain_and_streamed() {
    let s = start_tiny(1, 8, true).await;
    let mut body = ask("Water boils at what temperature at sea level?");
    body["rag"] = json!({"mode": "tta", "top_k": 3,
                         "tta": {"lr": 0.01, "steps": 3, "max_pairs": 2, "min_words": 4}});
    let (status, v) = post(&s.base, &body).await;
    assert_eq!(status, 200, "{v}");
    let rag = &v["rag"];
    assert_eq!(rag["mode"], "tta");
    let t = &rag["tta"];
    assert_eq!(t["scope"], "lora");
    assert_eq!(t["steps"], 3);
    assert!(
        t["pairs"].as_u64().unwrap() >= 1 && t["pairs"].as_u64().unwrap() <= 2,
        "{t}"
    );
    assert!(
        t["loss_after"].as_f64().unwrap() < t["loss_before"].as_f64().unwrap(),
        "{t}"
    );
    assert!(t["fallback"].is_null());
    assert!(rag["timings_ms"]["adapt"].as_f64().unwrap() > 0.0);

    body["stream"] = json!(true);
    let frames = sse(&s.base, &body).await;
    let last: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert_eq!(last["rag"]["tta"]["loss_before"], t["loss_before"]);
    assert_eq!(last["rag"]["tta"]["loss_after"], t["loss_after"]);
    let text = sse_text(&frames);
    assert_eq!(
        text,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Static requests afterwards are untouched by the adaptation.
    let (_, a) = post(&s.base, &ask("plants")).await;
    let fresh = start_tiny(1, 8, true).await;
    let (_, b) = post(&fresh.base, &ask("plants")).await;
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn tta_settings_beyond_the_caps_are_refused() {
    let s = start_tiny(1, 8, false).await;
    for (tta, param) in [
        (json!({"steps": 100000}), "rag.tta.steps"),
        (json!({"max_pairs": 0}), "rag.tta.max_pairs"),
        (json!({"lr": -1}), "rag.tta.lr"),
        (json!({"lora_rank": 100000}), "rag.tta.lora_rank"),
        (json!({"lora_targets": ["nope"]}), "rag.tta.lora_targets"),
        (json!({"scope": "everything"}), "rag.tta.scope"),
    ] {
        let mut body = ask("q");
        body["rag"] = json!({"mode": "tta", "tta": tta});
        let (st, v) = post(&s.base, &body).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

#[tokio::test]
async fn full_scope_adapts_a_copy_and_the_served_weights_stay_bit_identical() {
    // Requests may ask for full scope only where the operator allows it.
    let s = common::start_tiny_toml(2, 8, true, "[auth]\nfull_scope = \"any\"\n").await;
    let snapshot = || -> Vec<Vec<f32>> {
        s.model
            .decoder
            .named_weights()
            .into_iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    };
    let before = snapshot();
    let (_, static_before) = post(&s.base, &ask("plants")).await;
    let full = || {
        let mut body = ask("Water boils at what temperature at sea level?");
        body["rag"] = json!({"mode": "tta", "tta": {"scope": "full", "lr": 0.01, "steps": 2, "min_words": 4}});
        body
    };
    let futs = (0..3).map(|_| {
        let base = s.base.clone();
        let body = full();
        async move { post(&base, &body).await }
    });
    // One private weight copy at a time: a concurrent full-scope request is refused at once
    // (503, retry later) instead of holding its worker; retried alone, it is served.
    let mut answers = vec![];
    for (st, v) in futures::future::join_all(futs).await {
        match st {
            503 => {
                assert_eq!(v["error"]["code"], "busy", "{v}");
                answers.push(post(&s.base, &full()).await);
            }
            _ => answers.push((st, v)),
        }
    }
    for (st, v) in answers {
        assert_eq!(st, 200, "{v}");
        let t = &v["rag"]["tta"];
        assert_eq!(t["scope"], "full");
        assert_eq!(t["steps"], 2);
        assert!(
            t["loss_after"].as_f64().unwrap() < t["loss_before"].as_f64().unwrap(),
            "{t}"
        );
    }
    assert!(before == snapshot(), "served weights changed");
    let (_, static_after) = post(&s.base, &ask("plants")).await;
    assert_eq!(
        static_before["choices"][0]["message"]["content"],
        static_after["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn a_tta_request_without_a_seed_adapts_the_same_way_every_time_and_seed_overrides() {
    let s = start_tiny(1, 8, true).await;
    let mut body = ask("Water boils at what temperature at sea level?");
    body.as_object_mut().unwrap().remove("seed");
    body["rag"] = json!({"mode": "tta", "top_k": 3,
                         "tta": {"lr": 0.05, "steps": 3, "max_pairs": 2, "min_words": 4}});
    let run = |body: Value| {
        let base = s.base.clone();
        async move {
            let (status, v) = post(&base, &body).await;
            assert_eq!(status, 200, "{v}");
            (
                v["rag"]["tta"]["loss_after"].as_f64().unwrap(),
                v["choices"][0]["message"]["content"].clone(),
            )
        }
    };
    let first = run(body.clone()).await;
    let again = run(body.clone()).await;
    assert_eq!(first, again, "same request, same adaptation and answer");

    // An explicit seed still chooses the initialisation: two seeds, two adaptations.
    body["seed"] = json!(1);
    let one = run(body.clone()).await;
    assert_eq!(one, run(body.clone()).await);
    body["seed"] = json!(2);
    let two = run(body.clone()).await;
    assert_ne!(
        one.0, two.0,
        "the seed must reach the adapter's initialisation"
    );
}

#[tokio::test]
async fn adaptation_can_learn_from_more_passages_than_the_prompt_shows() {
    let s = start_tiny(1, 8, true).await;
    // Words of all three facts: BM25 ranks every one.
    let mut body = ask("Can plants grow where water boils at sea level?");
    let tta = json!({"lr": 0.01, "steps": 2, "max_pairs": 8, "min_words": 4});
    body["rag"] = json!({"mode": "tta", "top_k": 1, "tta": tta});
    let (status, one) = post(&s.base, &body).await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["rag"]["passages"].as_array().unwrap().len(), 1);
    assert_eq!(one["rag"]["tta"]["adapt_passages"], 1);

    body["rag"]["tta"]["adapt_top_k"] = json!(3);
    let (status, three) = post(&s.base, &body).await;
    assert_eq!(status, 200, "{three}");
    assert_eq!(
        three["rag"]["passages"], one["rag"]["passages"],
        "the prompt is unchanged"
    );
    assert_eq!(three["rag"]["tta"]["adapt_passages"], 3);
    assert!(
        three["rag"]["tta"]["pairs"].as_u64() > one["rag"]["tta"]["pairs"].as_u64(),
        "{} vs {}",
        three["rag"]["tta"],
        one["rag"]["tta"]
    );

    body["rag"]["tta"]["adapt_top_k"] = json!(51);
    let (status, v) = post(&s.base, &body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "rag.tta.adapt_top_k");
}

#[tokio::test]
async fn confident_selection_answers_with_whichever_answer_its_model_is_surer_of() {
    let s = start_tiny(1, 8, false).await;
    let q = "Can plants grow where water boils at sea level?";
    let tta = json!({"lr": 0.05, "steps": 3, "max_pairs": 2, "min_words": 4});
    let mut body = ask(q);
    body["rag"] = json!({"mode": "static", "top_k": 3});
    let (_, fixed) = post(&s.base, &body).await;
    body["rag"] = json!({"mode": "tta", "top_k": 3, "tta": tta});
    let (_, moved) = post(&s.base, &body).await;
    assert!(
        moved["rag"].get("selection").is_none(),
        "select defaults to adapted"
    );
    body["rag"]["tta"]["select"] = json!("confident");
    let (status, v) = post(&s.base, &body).await;
    assert_eq!(status, 200, "{v}");
    let sel = &v["rag"]["selection"];
    assert_eq!(sel["rule"], "confident");
    let (a, b) = (
        sel["static_logprob"].as_f64().unwrap(),
        sel["adapted_logprob"].as_f64().unwrap(),
    );
    assert!(a < 0.0 && b < 0.0, "{sel}");
    let content = |v: &Value| v["choices"][0]["message"]["content"].clone();
    let expected = if b >= a {
        ("adapted", &moved)
    } else {
        ("static", &fixed)
    };
    assert_eq!(sel["chosen"], expected.0, "{sel}");
    assert_eq!(content(&v), content(expected.1));
    assert_eq!(sel["same_answer"], content(&fixed) == content(&moved));

    // Streamed, the chosen answer arrives whole.
    body["stream"] = json!(true);
    let frames = sse(&s.base, &body).await;
    let text = sse_text(&frames);
    assert_eq!(Value::String(text), content(&v));

    body["stream"] = json!(false);
    body["rag"]["tta"]["select"] = json!("best");
    let (status, v) = post(&s.base, &body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "rag.tta.select");
}
