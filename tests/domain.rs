//! Domain adapters through the HTTP API: used only when asked (or by the config's default),
//! reported, stacked under a request's own adaptation without being written, and refused when
//! trained for other weights or for a collection that has changed since.

mod common;

use common::{post, start_tiny_with, tiny_domain_adapter, TINY_SHA};
use serde_json::{json, Value};

fn ask(q: &str, rag: Value) -> Value {
    json!({"model": "tiny", "messages": [{"role": "user", "content": q}],
           "max_tokens": 12, "temperature": 0, "seed": 1, "rag": rag})
}

fn text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Asks for the domain adapter and expects a 400 whose message says `why`.
async fn refused(base: &str, q: &str, why: &str) {
    let (st, v) = post(
        base,
        &ask(q, json!({"mode": "static", "domain_adapter": true})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "rag.domain_adapter");
    assert_eq!(v["error"]["code"], "domain_adapter_unavailable");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains(why), "{v}");
}

async fn server(adapters: &std::path::Path, default_on: &[&str]) -> common::TestServer {
    let mut cfg = ttarag::config::Config::default();
    cfg.auth.full_scope = ttarag::config::FullScope::Any;
    cfg.domain.dir = adapters.to_path_buf();
    cfg.domain.default_on = default_on.iter().map(|s| s.to_string()).collect();
    start_tiny_with(1, 8, true, cfg).await
}

#[tokio::test]
async fn a_request_answers_on_the_domain_adapter_only_when_asked_and_says_so() {
    let adapters = tempfile::tempdir().unwrap();
    let card = tiny_domain_adapter(adapters.path(), TINY_SHA);
    let s = server(adapters.path(), &[]).await;
    let q = "What do plants need to grow?";

    let (st, plain) = post(&s.base, &ask(q, json!({"mode": "static"}))).await;
    assert_eq!(st, 200, "{plain}");
    assert!(
        plain["rag"].get("domain_adapter").is_none(),
        "{}",
        plain["rag"]
    );

    let (st, on) = post(
        &s.base,
        &ask(q, json!({"mode": "static", "domain_adapter": true})),
    )
    .await;
    assert_eq!(st, 200, "{on}");
    let d = &on["rag"]["domain_adapter"];
    assert_eq!(d["used"], true, "{d}");
    assert_eq!(d["adapter_sha256"], card.adapter_sha256.as_str());
    assert_ne!(
        text(&on),
        text(&plain),
        "the adapter must change the answer"
    );
    let (_, again) = post(
        &s.base,
        &ask(q, json!({"mode": "static", "domain_adapter": true})),
    )
    .await;
    assert_eq!(text(&again), text(&on));

    let (_, off) = post(
        &s.base,
        &ask(q, json!({"mode": "static", "domain_adapter": false})),
    )
    .await;
    assert_eq!(text(&off), text(&plain));
    // No retrieval, no domain adapter: mode none answers from the base model.
    let (_, none) = post(
        &s.base,
        &ask(q, json!({"mode": "none", "domain_adapter": true})),
    )
    .await;
    assert!(none["rag"].get("domain_adapter").is_none());

    // The config's default turns it on per collection; a request can still turn it off.
    let dflt = server(adapters.path(), &["facts"]).await;
    let (_, by_default) = post(&dflt.base, &ask(q, json!({"mode": "static"}))).await;
    assert_eq!(by_default["rag"]["domain_adapter"]["used"], true);
    assert_eq!(text(&by_default), text(&on));
    let (_, opted_out) = post(
        &dflt.base,
        &ask(q, json!({"mode": "static", "domain_adapter": false})),
    )
    .await;
    assert_eq!(text(&opted_out), text(&plain));
}

#[tokio::test]
async fn adaptation_stacks_on_the_domain_adapter_and_never_writes_it() {
    let adapters = tempfile::tempdir().unwrap();
    tiny_domain_adapter(adapters.path(), TINY_SHA);
    let s = server(adapters.path(), &[]).await;
    let q = "Water boils at what temperature at sea level?";
    let tta = |domain: bool| {
        ask(
            q,
            json!({"mode": "tta", "top_k": 3, "domain_adapter": domain,
                      "tta": {"lr": 0.01, "steps": 3, "max_pairs": 2, "min_words": 4}}),
        )
    };
    let (_, before) = post(
        &s.base,
        &ask(q, json!({"mode": "static", "domain_adapter": true})),
    )
    .await;
    let (st, stacked) = post(&s.base, &tta(true)).await;
    assert_eq!(st, 200, "{stacked}");
    assert_eq!(stacked["rag"]["domain_adapter"]["used"], true);
    let (_, alone) = post(&s.base, &tta(false)).await;
    let loss = |v: &Value, k: &str| v["rag"]["tta"][k].as_f64().unwrap();
    // The request's adapter starts from the domain-adapted model, which knows these facts.
    assert!(
        loss(&stacked, "loss_before") < loss(&alone, "loss_before"),
        "{} vs {}",
        stacked["rag"]["tta"],
        alone["rag"]["tta"]
    );
    assert!(loss(&stacked, "loss_after") < loss(&stacked, "loss_before"));
    let (_, after) = post(
        &s.base,
        &ask(q, json!({"mode": "static", "domain_adapter": true})),
    )
    .await;
    assert_eq!(
        text(&after),
        text(&before),
        "a request's adaptation leaked into the domain adapter"
    );

    // Scope full trains its own weights: it does not stack, and says so.
    let mut full = tta(true);
    full["rag"]["tta"]["scope"] = json!("full");
    let (st, v) = post(&s.base, &full).await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("scope `full`"),
        "{v}"
    );
}

#[tokio::test]
async fn a_missing_or_stale_adapter_is_refused_when_asked_for_and_skipped_by_default() {
    let adapters = tempfile::tempdir().unwrap();
    let s = server(adapters.path(), &["facts"]).await;
    let q = "What can damage buildings?";
    refused(&s.base, q, "has no domain adapter").await;
    let (st, v) = post(&s.base, &ask(q, json!({"mode": "static"}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rag"]["domain_adapter"]["used"], false);
    assert!(v["rag"]["domain_adapter"]["reason"]
        .as_str()
        .unwrap()
        .contains("has no domain adapter"));

    // Trained on other weights.
    tiny_domain_adapter(adapters.path(), "other-weights");
    refused(&s.base, q, "other model weights").await;

    // Matching, then the collection changes under it (another process adds a passage).
    tiny_domain_adapter(adapters.path(), TINY_SHA);
    let (st, v) = post(
        &s.base,
        &ask(q, json!({"mode": "static", "domain_adapter": true})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let extra = adapters.path().join("more.jsonl");
    std::fs::write(
        &extra,
        "{\"id\": \"f4\", \"text\": \"Ice floats on water.\"}\n",
    )
    .unwrap();
    let cols = ttarag::retrieval::Collections::new(s.index_dir());
    cols.ingest("facts", &extra, 500, None).unwrap();
    refused(&s.base, q, "changed since it was trained").await;
    let (_, v) = post(&s.base, &ask(q, json!({"mode": "static"}))).await;
    assert_eq!(v["rag"]["domain_adapter"]["used"], false, "{v}");
}

#[tokio::test]
async fn an_ab_arm_can_run_on_the_domain_adapter() {
    let adapters = tempfile::tempdir().unwrap();
    tiny_domain_adapter(adapters.path(), TINY_SHA);
    let mut cfg = ttarag::config::Config::default();
    cfg.domain.dir = adapters.path().to_path_buf();
    cfg.ab = toml::from_str(
        "[[arms]]\nname = \"domain\"\nweight = 1.0\nmode = \"static\"\ndomain_adapter = true\n",
    )
    .unwrap();
    let s = start_tiny_with(1, 8, true, cfg).await;
    let (st, v) = post(&s.base, &ask("plants", json!({}))).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["rag"]["arm"], "domain");
    assert_eq!(v["rag"]["domain_adapter"]["used"], true, "{v}");
}

/// The QASC adapter shipped in `index/adapters/qasc` fits the default model's exact weights
/// and the sample collection as a fresh clone builds it, so `"domain_adapter": true` works on
/// the default server without retraining; it is refused over another collection's content.
#[test]
fn the_shipped_qasc_adapter_fits_the_default_model_and_a_fresh_sample_collection() {
    use ttarag::adapt::domain::DomainAdapters;
    use ttarag::model::fingerprint::WeightsDigest;
    let root = common::root();
    let cfg = ttarag::config::Config::default();
    let dir = tempfile::tempdir().unwrap();
    let cols = ttarag::retrieval::Collections::new(dir.path());
    let sample = root.join(cfg.retrieval.sample_corpus.as_ref().unwrap());
    cols.ingest("qasc", &sample, cfg.retrieval.passage_max_chars, None)
        .unwrap();
    let now = cols.get("qasc").unwrap().fingerprint().unwrap();
    let model = common::default_model();
    let store = DomainAdapters::new(
        root.join(&cfg.domain.dir),
        WeightsDigest::of(common::default_model_path()),
        model.decoder.config().clone(),
        model.decoder.device().clone(),
        model.decoder.dtype(),
    );
    let a = store
        .get("qasc", &now)
        .unwrap()
        .expect("an adapter is shipped");
    assert_eq!(a.card.collection, "qasc");
    assert_eq!(a.card.fingerprint, now);

    let mut other = now.clone();
    other.passages += 1;
    match store.get("qasc", &other) {
        Err(e) => assert!(e.contains("collection"), "{e}"),
        Ok(_) => panic!("an adapter for other collection content was accepted"),
    }
}
