//! Test-time adaptation on the real default model, through the engine.

mod common;

use ttarag::config::Config;
use ttarag::engine::{
    resolve_tta, ChatJob, Completion, Engine, Event, RagMode, RagParams, TtaOverrides,
};
use ttarag::generate::GenParams;
use ttarag::model::ChatMessage;

fn engine(workers: usize) -> (Engine, tempfile::TempDir) {
    common::qasc_engine(workers)
}

fn job(question: &str, mode: RagMode, overrides: &TtaOverrides) -> ChatJob {
    let mut cfg = Config::default();
    // No time budget: concurrent runs are slower and must still take every step.
    cfg.tta.time_budget_ms = 0.0;
    ChatJob {
        messages: vec![ChatMessage::new("user", question)],
        gen: GenParams {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
        },
        rag: RagParams::plain(mode, "qasc", 3),
        tta: (mode == RagMode::Tta).then(|| resolve_tta(&cfg.tta, overrides, 7).unwrap()),
    }
}

fn wait(mut rx: ttarag::engine::Ticket) -> Completion {
    loop {
        match rx.blocking_recv().expect("engine replied") {
            Event::Text(_) => {}
            Event::Done(c) => return *c,
            Event::Error(e) => panic!("{e}"),
        }
    }
}

fn strong() -> TtaOverrides {
    TtaOverrides {
        lr: Some(1e-3),
        steps: Some(4),
        ..Default::default()
    }
}

#[test]
fn adaptation_lowers_the_suffix_loss_and_a_fresh_request_starts_from_the_base() {
    let (e, _dir) = engine(1);
    let q = "How do earthquakes damage buildings?";
    let first = wait(e.submit(job(q, RagMode::Tta, &strong())).unwrap());
    let t = first.rag.tta.clone().expect("tta report");
    assert_eq!(t.scope, "lora");
    assert!((1..=3).contains(&t.pairs), "{t:?}");
    assert_eq!(t.steps, 4);
    assert_eq!(t.fallback, None);
    let (before, after) = (t.loss_before.unwrap(), t.loss_after.unwrap());
    assert!(after < before - 0.05, "suffix loss {before} -> {after}");
    assert!(first.rag.timings_ms.adapt > 0.0);

    // Same passages, fresh request: its starting loss is the base model's, unchanged.
    let second = wait(e.submit(job(q, RagMode::Tta, &strong())).unwrap());
    assert_eq!(second.rag.tta.unwrap().loss_before.unwrap(), before);
    assert_eq!(second.text, first.text, "same request, same answer");
    // And a static request answers as if no adaptation had ever happened.
    let s1 = wait(
        e.submit(job(q, RagMode::Static, &TtaOverrides::default()))
            .unwrap(),
    );
    // Its folder must outlive the request: a collection whose folder is gone is unknown.
    let (fresh, _fresh_dir) = engine(1);
    let s2 = wait(
        fresh
            .submit(job(q, RagMode::Static, &TtaOverrides::default()))
            .unwrap(),
    );
    assert_eq!(s1.text, s2.text);
}

#[test]
fn concurrent_adapted_requests_do_not_leak_into_each_other() {
    let (e, _dir) = engine(2);
    let qs = [
        "What can damage buildings?",
        "What do plants need to make food?",
    ];
    let alone: Vec<Completion> = qs
        .iter()
        .map(|q| wait(e.submit(job(q, RagMode::Tta, &strong())).unwrap()))
        .collect();
    assert_ne!(alone[0].rag.passages, alone[1].rag.passages);
    {
        let rxs: Vec<_> = qs
            .iter()
            .map(|q| e.submit(job(q, RagMode::Tta, &strong())).unwrap())
            .collect();
        let together: Vec<Completion> = rxs.into_iter().map(wait).collect();
        for (a, t) in alone.iter().zip(&together) {
            assert_eq!(a.text, t.text);
            assert_eq!(
                a.rag.tta.as_ref().unwrap().loss_before,
                t.rag.tta.as_ref().unwrap().loss_before
            );
            assert_eq!(
                a.rag.tta.as_ref().unwrap().loss_after,
                t.rag.tta.as_ref().unwrap().loss_after
            );
        }
    }
}

/// Static and adapted requests decoded together in the scheduler's batch give the answers
/// they give alone, on the real model (q8_0 decode products and the fused decode attention,
/// both row-independent on every CPU).
#[test]
fn answers_are_the_same_alone_and_batched_on_the_real_model() {
    let (e, _dir) = engine(2);
    let qs = [
        "What can damage buildings?",
        "What do plants need to make food?",
        "Damming a river results in what?",
    ];
    let jobs: Vec<ChatJob> = qs
        .iter()
        .flat_map(|q| {
            [
                job(q, RagMode::Static, &TtaOverrides::default()),
                job(q, RagMode::Tta, &strong()),
            ]
        })
        .collect();
    let alone: Vec<String> = jobs
        .iter()
        .map(|j| wait(e.submit(j.clone()).unwrap()).text)
        .collect();
    let tickets: Vec<_> = jobs.iter().map(|j| e.submit(j.clone()).unwrap()).collect();
    let together: Vec<String> = tickets.into_iter().map(|t| wait(t).text).collect();
    assert_eq!(together, alone);
}

/// Bytes of every served weight, hashed: equal hashes before and after mean bit-identical.
fn weights_digest(m: &ttarag::model::Model) -> Vec<u64> {
    use std::hash::{Hash, Hasher};
    m.decoder
        .named_weights()
        .into_iter()
        .map(|(name, t)| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            name.hash(&mut h);
            for x in t.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                x.to_bits().hash(&mut h);
            }
            h.finish()
        })
        .collect()
}

#[test]
fn full_scope_lowers_the_loss_and_leaves_the_served_weights_bit_identical() {
    let (e, _dir) = engine(1);
    let before = weights_digest(&e.model);
    let full = TtaOverrides {
        scope: Some("full".into()),
        lr: Some(1e-5),
        ..Default::default()
    };
    let q = "What can damage buildings?";
    let plain = wait(
        e.submit(job(q, RagMode::Static, &TtaOverrides::default()))
            .unwrap(),
    );
    for _ in 0..2 {
        let c = wait(e.submit(job(q, RagMode::Tta, &full)).unwrap());
        let t = c.rag.tta.unwrap();
        assert_eq!((t.scope, t.fallback), ("full", None));
        assert!(
            t.loss_after.unwrap() < t.loss_before.unwrap(),
            "{:?}",
            t.loss_after
        );
    }
    assert_eq!(weights_digest(&e.model), before);
    let again = wait(
        e.submit(job(q, RagMode::Static, &TtaOverrides::default()))
            .unwrap(),
    );
    assert_eq!(plain.text, again.text);
}
