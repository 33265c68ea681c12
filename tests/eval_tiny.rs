//! `ttarag eval` on the tiny random model: fast checks of determinism and of failures recorded
//! rather than fatal.

mod common;

use std::path::Path;
use std::sync::Arc;

use ttarag::config::Config;
use ttarag::eval::dataset::Subset;
use ttarag::eval::record::Record;
use ttarag::eval::spec::EvalSpec;
use ttarag::eval::{run, EvalJob};

const QUESTIONS: &str = "{\"id\": \"q1\", \"question\": \"What can damage buildings?\", \"answers\": [\"earthquakes\"], \"gold_doc_ids\": [\"f1\"]}\n\
{\"id\": \"q2\", \"question\": \"Do plants need sunlight?\", \"answers\": [\"yes\"], \"choices\": [\"yes\", \"no\"]}\n\
{\"id\": \"q3\", \"question\": \"When does water boil?\", \"answers\": [\"100 degrees\"], \"gold_doc_ids\": [\"f3\"]}\n";

fn spec(dir: &Path, seed: u64) -> EvalSpec {
    std::fs::write(dir.join("q.jsonl"), QUESTIONS).unwrap();
    std::fs::write(dir.join("c.jsonl"), common::FACTS).unwrap();
    let text = format!(
        r#"
[dataset]
name = "facts"
questions = "{q}"
corpus = "{c}"
collection = "facts"

[run]
seed = {seed}
max_tokens = 8
temperature = 0.8
top_k = 1
bootstrap_resamples = 100

[[arms]]
name = "closed_book"
mode = "closed_book"

[[arms]]
name = "static"
mode = "static"

[[arms]]
name = "tta"
mode = "tta"
tta = {{ scope = "lora", lr = 1e-2, min_words = 3, time_budget_ms = 0 }}
"#,
        q = dir.join("q.jsonl").display(),
        c = dir.join("c.jsonl").display(),
    );
    toml::from_str(&text).unwrap()
}

fn eval(dir: &Path, seed: u64, out: &str) -> Vec<Record> {
    let mut cfg = Config::default();
    cfg.retrieval.index_dir = dir.join("index");
    let model = Arc::new(ttarag::model::tiny::tiny_model(1).unwrap());
    run(
        &cfg,
        model,
        EvalJob {
            spec: spec(dir, seed),
            subset: Subset::default(),
            only_arms: vec![],
            out: dir.join(out),
            fresh: false,
            progress: false,
        },
    )
    .unwrap();
    std::fs::read_to_string(dir.join(out).join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What a record says about the answer, without the wall times.
fn answer(r: &Record) -> serde_json::Value {
    let losses = r
        .tta
        .as_ref()
        .map(|t| (t["loss_before"].clone(), t["loss_after"].clone()));
    serde_json::json!([
        r.arm,
        r.id,
        r.output,
        r.correct,
        r.choice,
        r.retrieved,
        r.recall,
        losses
    ])
}

#[test]
fn the_same_seed_gives_the_same_records_and_another_seed_other_samples() {
    let dir = tempfile::tempdir().unwrap();
    let a = eval(dir.path(), 5, "a");
    let b = eval(dir.path(), 5, "b");
    assert_eq!(a.len(), 9);
    let a_answers: Vec<_> = a.iter().map(answer).collect();
    let b_answers: Vec<_> = b.iter().map(answer).collect();
    assert_eq!(a_answers, b_answers);
    for r in &a {
        assert!(r.error.is_none(), "{r:?}");
        if r.id == "q2" {
            assert_eq!(r.choice.as_ref().unwrap().scores.len(), 2);
        } else {
            assert!(r.choice.is_none());
        }
        if r.arm == "tta" {
            assert!(r.tta.is_some());
        }
    }
    let c = eval(dir.path(), 6, "c");
    let differs = a
        .iter()
        .zip(&c)
        .filter(|(x, y)| x.output != y.output)
        .count();
    assert!(differs > 0, "sampling follows the run seed");
}

#[test]
fn a_question_the_model_cannot_take_is_recorded_as_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    // Longer than the tiny model's 512-position context.
    let long = "why ".repeat(300);
    let mut s = spec(dir.path(), 0);
    std::fs::write(
        dir.path().join("q.jsonl"),
        format!("{{\"id\": \"long\", \"question\": \"{long}\", \"answers\": [\"x\"]}}\n"),
    )
    .unwrap();
    s.arms.truncate(1);
    let mut cfg = Config::default();
    cfg.retrieval.index_dir = dir.path().join("index");
    let out = run(
        &cfg,
        Arc::new(ttarag::model::tiny::tiny_model(1).unwrap()),
        EvalJob {
            spec: s,
            subset: Subset::default(),
            only_arms: vec![],
            out: dir.path().join("o"),
            fresh: false,
            progress: false,
        },
    )
    .unwrap();
    assert_eq!(out.summary.arms[0].errors, 1);
    assert_eq!(out.summary.arms[0].accuracy, 0.0);
    let md = std::fs::read_to_string(dir.path().join("o/report.md")).unwrap();
    assert!(md.contains("| closed_book | 1 |"), "{md}");
}
