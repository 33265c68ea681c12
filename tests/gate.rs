//! Request mode `auto` over HTTP: the gate's decision controls retrieval and adaptation, shows in
//! the response's `rag.gate` and timings, and is counted in `/metrics`.

mod common;

use common::{constant_gate, post, start_tiny, start_tiny_with, TestServer};
use serde_json::{json, Value};

fn ask(rag: Value) -> Value {
    json!({"model": "tiny", "max_tokens": 8, "temperature": 0, "seed": 1, "rag": rag,
           "messages": [{"role": "user", "content": "What can damage buildings?"}]})
}

/// A server whose gate always puts S3 (retrieval harms) first: P = softmax([0, 0, 5, 0]).
async fn gated(tweak: impl FnOnce(&mut ttarag::config::Config)) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ttarag::config::Config::default();
    cfg.gate.probe = Some(constant_gate(dir.path(), [0.0, 0.0, 5.0, 0.0]));
    tweak(&mut cfg);
    (start_tiny_with(1, 8, false, cfg).await, dir)
}

#[tokio::test]
async fn the_gate_skips_retrieval_and_adaptation_when_it_says_so() {
    let (s, _d) = gated(|_| {}).await;
    // Default policy (optimistic): S3 is the argmax, so retrieval is skipped.
    let (status, skip) = post(
        &s.base,
        &ask(json!({"mode": "auto", "gate": {"then": "tta"}})),
    )
    .await;
    assert_eq!(status, 200, "{skip}");
    let rag = &skip["rag"];
    assert_eq!(rag["mode"], "none");
    assert_eq!(rag["passages"].as_array().unwrap().len(), 0);
    assert!(
        rag.get("tta").is_none(),
        "no adaptation when skipped: {rag}"
    );
    assert_eq!(rag["timings_ms"]["adapt"], 0.0);
    let g = &rag["gate"];
    assert_eq!(g["policy"], "optimistic");
    assert_eq!(g["decision"], "skip");
    assert_eq!(g["layer"], 1);
    assert!(g["gate_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(rag["timings_ms"]["gate"], g["gate_ms"]);
    let p: Vec<f64> = ["S1", "S2", "S3", "S4"]
        .iter()
        .map(|k| g["probs"][k].as_f64().unwrap())
        .collect();
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-4, "{p:?}");
    assert!(p[2] > 0.9 && (p[0] - p[1]).abs() < 1e-6, "{p:?}");

    // The same question with a policy that retrieves: passages and adaptation come back.
    let (status, go) = post(
        &s.base,
        &ask(json!({"mode": "auto", "gate": {"policy": "always", "then": "tta"}})),
    )
    .await;
    assert_eq!(status, 200, "{go}");
    assert_eq!(go["rag"]["mode"], "tta");
    assert_eq!(go["rag"]["gate"]["decision"], "retrieve");
    assert_eq!(go["rag"]["passages"][0]["id"], "f1");
    assert!(go["rag"]["tta"].is_object());
    assert!(
        go["usage"]["prompt_tokens"].as_u64() > skip["usage"]["prompt_tokens"].as_u64(),
        "skipping retrieval leaves the passages out of the prompt"
    );

    // threshold:<t> reads P(S2) (about 0.007 here).
    for (t, want) in [("threshold:0.5", "skip"), ("threshold:0.001", "retrieve")] {
        let (_, v) = post(
            &s.base,
            &ask(json!({"mode": "auto", "gate": {"policy": t}})),
        )
        .await;
        assert_eq!(v["rag"]["gate"]["decision"], want, "{t}: {v}");
        let mode = if want == "skip" { "none" } else { "static" };
        assert_eq!(v["rag"]["mode"], mode);
    }

    let metrics = reqwest::get(format!("{}/metrics", s.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("ttarag_gate_decisions_total{decision=\"skip\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("ttarag_gate_decisions_total{decision=\"retrieve\"} 2"));
    assert!(metrics.contains("ttarag_requests_total{mode=\"auto\",status=\"200\"} 4"));
}

#[tokio::test]
async fn a_post_pass_gate_retrieves_first_and_a_skip_still_saves_adaptation() {
    let (s, _d) = gated(|c| {
        let dir = c
            .gate
            .probe
            .as_ref()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        c.gate.probe = Some(common::constant_gate_pass(
            &dir,
            [0.0, 0.0, 5.0, 0.0],
            common::TINY_SHA,
            "post",
        ));
    })
    .await;
    let (status, skip) = post(
        &s.base,
        &ask(json!({"mode": "auto", "gate": {"then": "tta"}})),
    )
    .await;
    assert_eq!(status, 200, "{skip}");
    let rag = &skip["rag"];
    assert_eq!(
        (&rag["mode"], &rag["gate"]["decision"]),
        (&json!("none"), &json!("skip"))
    );
    assert_eq!(rag["passages"].as_array().unwrap().len(), 0, "{rag}");
    assert!(rag.get("tta").is_none(), "{rag}");
    assert!(
        rag["timings_ms"]["retrieve"].as_f64().unwrap() > 0.0,
        "the post pass reads the passages, so retrieval ran: {rag}"
    );
    let (_, go) = post(
        &s.base,
        &ask(json!({"mode": "auto", "gate": {"policy": "always", "then": "tta"}})),
    )
    .await;
    assert_eq!(go["rag"]["mode"], "tta", "{go}");
    assert_eq!(go["rag"]["passages"][0]["id"], "f1");
    assert!(go["rag"]["tta"].is_object());
}

#[tokio::test]
async fn an_ab_arm_in_mode_auto_runs_the_gate_with_its_own_settings() {
    let (s, _d) = gated(|c| {
        c.ab.arms = vec![
            serde_json::from_value(json!({"name": "plain", "weight": 1.0, "mode": "static"}))
                .unwrap(),
            serde_json::from_value(json!({"name": "gated", "weight": 1.0, "mode": "auto",
                                          "gate": {"policy": "pessimistic"}}))
            .unwrap(),
        ];
    })
    .await;
    let (status, v) = post(&s.base, &ask(json!({"arm": "gated"}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rag"]["arm"], "gated");
    assert_eq!(v["rag"]["gate"]["policy"], "pessimistic");
    assert_eq!(v["rag"]["gate"]["decision"], "skip");
    assert_eq!(v["rag"]["mode"], "none");
    let (_, v) = post(&s.base, &ask(json!({"arm": "plain"}))).await;
    assert!(v["rag"].get("gate").is_none(), "{v}");
    assert_eq!(v["rag"]["mode"], "static");
}

#[tokio::test]
async fn a_question_over_the_context_is_a_400_from_the_gate_too() {
    let (s, _d) = gated(|_| {}).await;
    let long = "why ".repeat(4000);
    let body = json!({"model": "tiny", "max_tokens": 4, "rag": {"mode": "auto"},
                      "messages": [{"role": "user", "content": long}]});
    let (status, v) = post(&s.base, &body).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
}

#[tokio::test]
async fn per_collection_policy_and_default_mode_come_from_the_config() {
    let (s, _d) = gated(|c| {
        c.gate.default_mode = "auto".into();
        c.gate
            .collection_policies
            .insert("facts".into(), "pessimistic".parse().unwrap());
    })
    .await;
    // No mode in the request: the configured default (auto) with the collection's policy.
    let (status, v) = post(&s.base, &ask(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["rag"]["gate"]["policy"], "pessimistic");
    assert_eq!(v["rag"]["gate"]["decision"], "skip");
    // A request's explicit mode bypasses the gate.
    let (_, v) = post(&s.base, &ask(json!({"mode": "static"}))).await;
    assert!(v["rag"].get("gate").is_none());
    assert_eq!(v["rag"]["mode"], "static");
}

/// A server whose retrieval gate always retrieves (S2 first) and whose adaptation gate puts S3
/// (adaptation harms) first, or S2 (it helps) when `helps`.
async fn adapt_gated(helps: bool) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ttarag::config::Config::default();
    cfg.gate.probe = Some(constant_gate(dir.path(), [0.0, 5.0, 0.0, 0.0]));
    let logits = match helps {
        true => [0.0, 5.0, 0.0, 0.0],
        false => [0.0, 0.0, 5.0, 0.0],
    };
    cfg.gate.adapt_probe = Some(common::constant_adapt_gate(dir.path(), logits));
    (start_tiny_with(1, 8, false, cfg).await, dir)
}

#[tokio::test]
async fn the_adaptation_gate_chooses_between_static_and_tta_after_retrieval() {
    let (harms, _d) = adapt_gated(false).await;
    let rag = json!({"mode": "auto", "gate": {"then": "tta", "adapt": "optimistic"}});
    let (status, v) = post(&harms.base, &ask(rag.clone())).await;
    assert_eq!(status, 200, "{v}");
    let r = &v["rag"];
    assert_eq!(r["gate"]["decision"], "retrieve");
    assert_eq!(r["gate"]["decides"], "retrieval");
    let a = &r["adapt_gate"];
    assert_eq!(
        (&a["decides"], &a["decision"], &a["policy"]),
        (&json!("adaptation"), &json!("skip"), &json!("optimistic"))
    );
    assert_eq!(
        r["mode"], "static",
        "a skip answers from the same passages: {r}"
    );
    assert_eq!(r["passages"][0]["id"], "f1");
    assert!(r.get("tta").is_none(), "no adaptation ran: {r}");
    assert_eq!(r["timings_ms"]["adapt"], 0.0);
    let gate_ms = r["gate"]["gate_ms"].as_f64().unwrap() + a["gate_ms"].as_f64().unwrap();
    let timed = r["timings_ms"]["gate"].as_f64().unwrap();
    assert!((timed - gate_ms).abs() < 1e-6, "{timed} vs {gate_ms}");

    // The configured policy (always) adapts and only reports.
    let (_, v) = post(
        &harms.base,
        &ask(json!({"mode": "auto", "gate": {"then": "tta"}})),
    )
    .await;
    assert_eq!(v["rag"]["mode"], "tta", "{v}");
    assert_eq!(v["rag"]["adapt_gate"]["decision"], "adapt");
    assert!(v["rag"]["tta"].is_object());
    // Static `then` never consults the adaptation gate.
    let (_, v) = post(&harms.base, &ask(json!({"mode": "auto"}))).await;
    assert!(v["rag"].get("adapt_gate").is_none(), "{v}");

    let (helps, _d2) = adapt_gated(true).await;
    let (_, v) = post(&helps.base, &ask(rag)).await;
    assert_eq!(v["rag"]["mode"], "tta", "{v}");
    assert_eq!(v["rag"]["adapt_gate"]["decision"], "adapt");
    assert!(v["rag"]["tta"]["steps"].as_u64().unwrap() > 0, "{v}");

    let metrics = reqwest::get(format!("{}/metrics", harms.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "ttarag_adapt_gate_decisions_total{decision=\"skip\"} 1",
        "ttarag_adapt_gate_decisions_total{decision=\"adapt\"} 1",
        "ttarag_gate_decisions_total{decision=\"retrieve\"} 3",
    ] {
        assert!(metrics.contains(want), "{want}: {metrics}");
    }
}

#[tokio::test]
async fn adaptation_gate_requests_that_cannot_run_are_refused() {
    // No adaptation gate configured.
    let (s, _d) = gated(|_| {}).await;
    let (status, v) = post(
        &s.base,
        &ask(json!({"mode": "auto", "gate": {"then": "tta", "adapt": "optimistic"}})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "rag.gate.adapt");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gate.adapt_probe"),
        "{v}"
    );
    let (s, _d) = adapt_gated(false).await;
    for rag in [
        json!({"mode": "auto", "gate": {"then": "static", "adapt": "optimistic"}}),
        json!({"mode": "tta", "gate": {"adapt": "optimistic"}}),
    ] {
        let (status, v) = post(&s.base, &ask(rag.clone())).await;
        assert_eq!(status, 400, "{rag}: {v}");
        assert!(
            v["error"]["param"]
                .as_str()
                .unwrap()
                .starts_with("rag.gate"),
            "{rag}: {v}"
        );
    }
}

#[test]
fn a_retrieval_card_is_refused_as_the_adaptation_gate_and_the_reverse() {
    use candle_core::Device;
    use ttarag::gate::card::{Decides, LoadedGate};
    let dir = tempfile::tempdir().unwrap();
    let model = ttarag::model::tiny::tiny_model(3).unwrap();
    let load = |p: &std::path::Path| LoadedGate::load(p, &model, common::TINY_SHA, &Device::Cpu);
    let retrieval = load(&constant_gate(dir.path(), [0.0; 4])).unwrap();
    let adaptation = load(&common::constant_adapt_gate(dir.path(), [0.0; 4])).unwrap();
    assert_eq!(adaptation.card.decides, Decides::Adaptation);
    let e = retrieval.clone().expect(Decides::Adaptation).unwrap_err();
    assert!(e.to_string().contains("decides retrieval"), "{e}");
    assert!(adaptation.clone().expect(Decides::Retrieval).is_err());
    assert!(retrieval.expect(Decides::Retrieval).is_ok());
    assert!(adaptation.expect(Decides::Adaptation).is_ok());
}

#[tokio::test]
async fn gate_requests_that_cannot_run_are_refused_with_openai_errors() {
    let plain = start_tiny(1, 8, false).await;
    let (status, v) = post(&plain.base, &ask(json!({"mode": "auto"}))).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "rag.mode");
    assert!(v["error"]["message"].as_str().unwrap().contains("gate"));

    let (s, _d) = gated(|_| {}).await;
    let cases = [
        (
            json!({"mode": "static", "gate": {"policy": "always"}}),
            "rag.gate",
        ),
        (
            json!({"mode": "auto", "gate": {"then": "none"}}),
            "rag.gate.then",
        ),
        (json!({"mode": "sometimes"}), "rag.mode"),
    ];
    for (rag, param) in cases {
        let (status, v) = post(&s.base, &ask(rag.clone())).await;
        assert_eq!(status, 400, "{rag}: {v}");
        assert_eq!(v["error"]["param"], param, "{rag}: {v}");
    }
    let (status, v) = post(
        &s.base,
        &ask(json!({"mode": "auto", "gate": {"policy": "often"}})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("policy"),
        "{v}"
    );
}

/// The probe shipped in `configs/gate/` fits the default model's exact weights and gives that
/// model a usable decision; another model's shape is refused.
#[test]
fn the_shipped_probe_loads_for_the_default_model_only() {
    use candle_core::Device;
    use ttarag::gate::card::LoadedGate;
    use ttarag::gate::policy::Policy;
    use ttarag::model::ChatMessage;

    let card = common::root().join("configs/gate/smollm2-135m-instruct.json");
    let model = common::default_model();
    let sha = ttarag::model::fingerprint::weights_sha256(&common::default_model_path()).unwrap();
    let gate = LoadedGate::load(&card, &model, &sha, &Device::Cpu).unwrap();
    assert_eq!(
        ttarag::config::Config::default().gate.probe.as_deref(),
        Some(std::path::Path::new(
            "configs/gate/smollm2-135m-instruct.json"
        )),
        "the default config names the shipped probe"
    );
    let ask = |q: &str| {
        gate.assess(
            &model,
            &[ChatMessage::new("user", q)],
            None,
            Policy::Optimistic,
        )
        .unwrap()
    };
    for q in ["What can damage buildings?", "Hi there, how are you?"] {
        let r = ask(q);
        let total: f32 = r.probs.values().sum();
        assert!((total - 1.0).abs() < 1e-4, "{q}: {:?}", r.probs);
        assert_eq!(r.layer, gate.card.features.layer);
    }

    let tiny = ttarag::model::tiny::tiny_model(1).unwrap();
    let e = LoadedGate::load(&card, &tiny, &sha, &Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("hidden size"), "{e:#}");
    let e = LoadedGate::load(&card, &model, "0123", &Device::Cpu).unwrap_err();
    assert!(format!("{e:#}").contains("sha256"), "{e:#}");
}

/// The shipped adaptation probe fits the default model, decides adaptation, and is the one
/// the default config names (its default policy only reports).
#[test]
fn the_shipped_adaptation_probe_loads_for_the_default_model() {
    use candle_core::Device;
    use ttarag::gate::card::{Decides, LoadedGate};
    use ttarag::gate::policy::Policy;
    use ttarag::model::ChatMessage;

    let cfg = ttarag::config::Config::default();
    let rel = cfg
        .gate
        .adapt_probe
        .clone()
        .expect("the default config names one");
    assert_eq!(cfg.gate.adapt_policy, Policy::Always);
    let model = common::default_model();
    let sha = ttarag::model::fingerprint::weights_sha256(&common::default_model_path()).unwrap();
    let gate = LoadedGate::load(&common::root().join(rel), &model, &sha, &Device::Cpu)
        .unwrap()
        .expect(Decides::Adaptation)
        .unwrap();
    let r = gate
        .assess(
            &model,
            &[ChatMessage::new("user", "What can damage buildings?")],
            None,
            Policy::Always,
        )
        .unwrap();
    assert_eq!((r.decides, r.action()), (Decides::Adaptation, "adapt"));
    let total: f32 = r.probs.values().sum();
    assert!((total - 1.0).abs() < 1e-4, "{:?}", r.probs);
}
