//! Live A/B testing between RAG arms over real HTTP, on the tiny random-weight model.

mod common;

use std::collections::HashMap;

use common::{post_json, start_tiny, start_tiny_with, TestServer};
use futures::StreamExt;
use serde_json::{json, Value};
use ttarag::config::Config;

/// A tiny server whose `[ab]` section has these arms (TOML inline tables).
async fn server(arms: &str) -> TestServer {
    let cfg = Config::from_toml(&format!("[ab]\narms = [{arms}]\n")).unwrap();
    start_tiny_with(1, 64, false, cfg).await
}

const HALF_HALF: &str = "{name = \"static\", weight = 1.0, mode = \"static\"}, \
                         {name = \"none\", weight = 1.0, mode = \"none\"}";

fn ask() -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": "What can damage buildings?"}],
           "max_tokens": 1, "temperature": 0, "seed": 1})
}

fn with_rag(rag: Value) -> Value {
    let mut b = ask();
    b["rag"] = rag;
    b
}

async fn chat(base: &str, body: &Value) -> Value {
    let (status, v) = post_json(base, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn get_text(base: &str, path: &str) -> String {
    reqwest::get(format!("{base}{path}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn summary(base: &str) -> HashMap<String, Value> {
    let v: Value = serde_json::from_str(&get_text(base, "/v1/ab/summary").await).unwrap();
    v["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["name"].as_str().unwrap().to_string(), a.clone()))
        .collect()
}

/// The value of one exact series in the Prometheus text, 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn assert_error(status: u16, v: &Value, want_status: u16, param: Option<&str>, code: &str) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert_eq!(e["type"], "invalid_request_error", "{v}");
    assert!(!e["message"].as_str().unwrap().is_empty());
    assert_eq!(e["param"].as_str(), param, "{v}");
    assert_eq!(e["code"], code, "{v}");
}

#[tokio::test]
async fn unkeyed_requests_split_by_weight_and_metrics_count_them() {
    let s = server(HALF_HALF).await;
    let n = 200;
    let mut seen: HashMap<String, u64> = HashMap::new();
    for _ in 0..n {
        let v = chat(&s.base, &ask()).await;
        let arm = v["rag"]["arm"].as_str().unwrap().to_string();
        // The arm's mode is what ran.
        assert_eq!(v["rag"]["mode"], arm.as_str());
        *seen.entry(arm).or_default() += 1;
    }
    for arm in ["static", "none"] {
        let got = seen.get(arm).copied().unwrap_or(0);
        let share = got as f64 / n as f64;
        assert!((0.35..=0.65).contains(&share), "{arm}: {got} of {n}");
    }
    let text = get_text(&s.base, "/metrics").await;
    let sum = summary(&s.base).await;
    for arm in ["static", "none"] {
        let got = seen[arm] as f64;
        let series = format!("ttarag_arm_requests_total{{arm=\"{arm}\",status=\"200\"}}");
        assert_eq!(metric(&text, &series), got, "{series}");
        let count = format!("ttarag_arm_request_duration_seconds_count{{arm=\"{arm}\"}}");
        assert_eq!(metric(&text, &count), got, "{count}");
        assert_eq!(sum[arm]["requests"].as_f64().unwrap(), got);
        assert_eq!(sum[arm]["errors"], 0);
        assert!(sum[arm]["latency_ms"]["mean"].as_f64().unwrap() > 0.0);
        assert!(sum[arm]["latency_ms"]["p50"].as_f64().unwrap() > 0.0);
        assert_eq!(sum[arm]["weight"], 1.0);
        assert_eq!(sum[arm]["mode"], arm);
        assert!(sum[arm]["adapt_loss_delta_mean"].is_null());
    }
}

#[tokio::test]
async fn the_same_user_or_session_keeps_its_arm() {
    let s = server(HALF_HALF).await;
    let mut arms_seen = std::collections::HashSet::new();
    for u in 0..12 {
        let mut body = ask();
        body["user"] = json!(format!("user-{u}"));
        let first = chat(&s.base, &body).await["rag"]["arm"].clone();
        for _ in 0..4 {
            assert_eq!(chat(&s.base, &body).await["rag"]["arm"], first, "user-{u}");
        }
        arms_seen.insert(first.to_string());
    }
    // Twelve users on a 50/50 split all on one arm would mean the key is ignored.
    assert_eq!(arms_seen.len(), 2);
    let client = reqwest::Client::new();
    for sid in ["abc", "def", "ghi"] {
        let mut arms = vec![];
        for _ in 0..5 {
            let v: Value = client
                .post(format!("{}/v1/chat/completions", s.base))
                .header("x-session-id", sid)
                .json(&ask())
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            arms.push(v["rag"]["arm"].clone());
        }
        assert!(arms.iter().all(|a| a == &arms[0]), "{sid}: {arms:?}");
    }
}

#[tokio::test]
async fn pinned_arms_are_honoured_and_unknown_ones_refused() {
    let s = server(HALF_HALF).await;
    for _ in 0..20 {
        let v = chat(&s.base, &with_rag(json!({"arm": "none"}))).await;
        assert_eq!(v["rag"]["arm"], "none");
        assert_eq!(v["rag"]["mode"], "none");
    }
    let (status, v) = post_json(
        &s.base,
        "/v1/chat/completions",
        &with_rag(json!({"arm": "nope"})),
    )
    .await;
    assert_error(status, &v, 400, Some("rag.arm"), "unknown_arm");
    let (status, v) = post_json(
        &s.base,
        "/v1/chat/completions",
        &with_rag(json!({"arm": "none", "mode": "static"})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(summary(&s.base).await["none"]["requests"], 20);

    // A server without arms refuses pins too.
    let plain = start_tiny(1, 8, false).await;
    let (status, v) = post_json(
        &plain.base,
        "/v1/chat/completions",
        &with_rag(json!({"arm": "static"})),
    )
    .await;
    assert_error(status, &v, 400, Some("rag.arm"), "unknown_arm");
    let v = chat(&plain.base, &ask()).await;
    assert!(v["rag"].get("arm").is_none(), "{v}");
    let v: Value = serde_json::from_str(&get_text(&plain.base, "/v1/ab/summary").await).unwrap();
    assert_eq!(v, json!({"arms": []}));
}

#[tokio::test]
async fn the_arm_is_in_the_json_response_and_the_last_streamed_chunk() {
    let s = server(HALF_HALF).await;
    let v = chat(&s.base, &with_rag(json!({"arm": "static"}))).await;
    assert_eq!(v["rag"]["arm"], "static");
    assert_eq!(v["rag"]["collection"], "facts");
    assert!(!v["rag"]["passages"].as_array().unwrap().is_empty());

    let mut body = with_rag(json!({"arm": "static"}));
    body["stream"] = json!(true);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut text = String::new();
    let mut stream = r.bytes_stream();
    while let Some(b) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&b.unwrap()));
    }
    let frames: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(frames.last(), Some(&"[DONE]"));
    let last: Value = serde_json::from_str(frames[frames.len() - 2]).unwrap();
    assert_eq!(last["rag"]["arm"], "static");
    assert_eq!(last["rag"]["mode"], "static");
    // Streamed responses take feedback too.
    let id = last["id"].as_str().unwrap();
    let (status, v) = post_json(&s.base, "/v1/feedback", &json!({"id": id, "rating": 4})).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn feedback_statuses_and_summary_accuracy() {
    let s = server(HALF_HALF).await;
    let mut ids = vec![];
    for _ in 0..4 {
        let v = chat(&s.base, &with_rag(json!({"arm": "static"}))).await;
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    let fb = |body: Value| {
        let base = s.base.clone();
        async move { post_json(&base, "/v1/feedback", &body).await }
    };
    let (status, v) = fb(json!({"id": ids[0], "correct": true, "comment": "spot on"})).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"id": ids[0], "arm": "static", "recorded": true}));
    let (status, v) = fb(json!({"id": ids[0], "correct": false})).await;
    assert_error(status, &v, 409, Some("id"), "duplicate_feedback");
    let (status, v) = fb(json!({"id": ids[1], "correct": true, "rating": 5})).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = fb(json!({"id": ids[2], "correct": false, "rating": 2})).await;
    assert_eq!(status, 200, "{v}");

    let unknown = "chatcmpl-00000000000000000000000000000000";
    let (status, v) = fb(json!({"id": unknown, "correct": true})).await;
    assert_error(status, &v, 404, Some("id"), "unknown_response");
    let (status, v) = fb(json!({"id": "garbage", "correct": true})).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = fb(json!({"id": ids[3]})).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].is_string());
    let (status, _) = fb(json!({})).await;
    assert_eq!(status, 400);
    for bad in [json!(0), json!(6), json!(2.5), json!("5")] {
        let (status, v) = fb(json!({"id": ids[3], "rating": bad})).await;
        assert_eq!(status, 400, "{bad}: {v}");
    }
    let (status, _) = fb(json!({"id": ids[3], "correct": true, "comment": "x".repeat(2001)})).await;
    assert_eq!(status, 400);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/feedback", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Refused feedback used nothing up.
    let (status, _) = fb(json!({"id": ids[3], "correct": true})).await;
    assert_eq!(status, 200);

    let sum = summary(&s.base).await;
    let f = &sum["static"]["feedback"];
    assert_eq!(f["count"], 4);
    assert_eq!(
        (f["correct"].as_u64(), f["incorrect"].as_u64()),
        (Some(3), Some(1))
    );
    assert_eq!(f["accuracy"].as_f64(), Some(3.0 / 4.0));
    assert_eq!(f["rating_mean"].as_f64(), Some(3.5));
    let none = &sum["none"]["feedback"];
    assert_eq!(none["count"], 0);
    assert!(none["accuracy"].is_null() && none["rating_mean"].is_null());

    let text = get_text(&s.base, "/metrics").await;
    for (signal, n) in [("correct", 3.0), ("incorrect", 1.0), ("rating", 2.0)] {
        let series = format!("ttarag_feedback_total{{arm=\"static\",signal=\"{signal}\"}}");
        assert_eq!(metric(&text, &series), n, "{series}");
    }
}

#[tokio::test]
async fn an_explicit_mode_stays_outside_the_experiment() {
    let s = server(HALF_HALF).await;
    let before = summary(&s.base).await;
    let v = chat(&s.base, &with_rag(json!({"mode": "static"}))).await;
    assert_eq!(v["rag"]["mode"], "static");
    assert!(v["rag"].get("arm").is_none(), "{v}");
    // Its response cannot take feedback: no arm to credit.
    let (status, e) = post_json(
        &s.base,
        "/v1/feedback",
        &json!({"id": v["id"], "correct": true}),
    )
    .await;
    assert_error(status, &e, 404, Some("id"), "unknown_response");
    assert_eq!(summary(&s.base).await, before);
    let text = get_text(&s.base, "/metrics").await;
    assert!(!text.contains("ttarag_arm_requests_total{"), "{text}");
}

#[tokio::test]
async fn a_tta_arm_reports_its_loss_change_and_request_fields_win() {
    let s = server(
        "{name = \"static\", weight = 1.0, mode = \"static\"}, \
         {name = \"tta\", weight = 1.0, mode = \"tta\", \
          tta = {lr = 0.01, steps = 2, max_pairs = 2, min_words = 4}}",
    )
    .await;
    let v = chat(&s.base, &with_rag(json!({"arm": "tta"}))).await;
    assert_eq!(v["rag"]["arm"], "tta");
    assert_eq!(v["rag"]["mode"], "tta");
    assert_eq!(v["rag"]["tta"]["steps"], 2, "{v}");
    // The request's own tta fields override the arm's.
    let v = chat(
        &s.base,
        &with_rag(json!({"arm": "tta", "tta": {"steps": 1}})),
    )
    .await;
    assert_eq!(v["rag"]["tta"]["steps"], 1, "{v}");

    let sum = summary(&s.base).await;
    assert_eq!(sum["tta"]["requests"], 2);
    assert!(
        sum["tta"]["adapt_loss_delta_mean"].is_number(),
        "{:?}",
        sum["tta"]
    );
    let text = get_text(&s.base, "/metrics").await;
    assert_eq!(
        metric(&text, "ttarag_arm_adapt_loss_delta_count{arm=\"tta\"}"),
        2.0
    );
}

#[tokio::test]
async fn the_summary_compares_each_arm_with_the_baseline_and_says_when_it_can_tell() {
    let s = server(HALF_HALF).await;
    let mut ids: HashMap<&str, Vec<String>> = HashMap::new();
    for arm in ["static", "none"] {
        for _ in 0..30 {
            let v = chat(&s.base, &with_rag(json!({"arm": arm}))).await;
            ids.entry(arm)
                .or_default()
                .push(v["id"].as_str().unwrap().to_string());
        }
    }
    let rate = |arm: &'static str, which: std::ops::Range<usize>, correct: bool| {
        let (base, ids) = (s.base.clone(), ids[arm][which].to_vec());
        async move {
            for id in ids {
                let body =
                    json!({"id": id, "correct": correct, "rating": if correct { 5 } else { 1 }});
                assert_eq!(post_json(&base, "/v1/feedback", &body).await.0, 200);
            }
        }
    };
    rate("static", 0..30, true).await;
    rate("none", 0..29, false).await;
    let sum = summary(&s.base).await;
    assert!(
        sum["static"].get("vs_baseline").is_none(),
        "the baseline is not compared with itself"
    );
    let c = &sum["none"]["vs_baseline"];
    assert_eq!(c["baseline"], "static");
    assert_eq!(
        c["verdict"], "insufficient_feedback",
        "29 labelled answers are too few: {c}"
    );
    assert_eq!(c["enough_feedback"], false);
    assert!(c["latency_ms"]["ci95"].is_array(), "{c}");

    rate("none", 29..30, false).await;
    let c = summary(&s.base).await["none"]["vs_baseline"].clone();
    assert_eq!(c["verdict"], "worse", "{c}");
    assert_eq!(c["accuracy"]["diff"].as_f64(), Some(-1.0));
    let ci = c["accuracy"]["ci95"].as_array().unwrap();
    assert!(
        ci[1].as_f64().unwrap() < 0.0,
        "the interval excludes zero: {c}"
    );
    assert!(c["accuracy"]["p_value"].as_f64().unwrap() < 1e-6);
    assert_eq!(c["rating"]["diff"].as_f64(), Some(-4.0));
}
