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
    eval_with(&cfg, spec(dir, seed), dir.join(out)).unwrap();
    std::fs::read_to_string(dir.join(out).join("records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Runs `spec` on the tiny model into `out`.
fn eval_with(
    cfg: &Config,
    spec: EvalSpec,
    out: std::path::PathBuf,
) -> anyhow::Result<ttarag::eval::EvalOutcome> {
    run(
        cfg,
        Arc::new(ttarag::model::tiny::tiny_model(1).unwrap()),
        EvalJob {
            spec,
            subset: Subset::default(),
            only_arms: vec![],
            out,
            fresh: false,
            progress: false,
        },
    )
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
    let out = eval_with(&cfg, s, dir.path().join("o")).unwrap();
    assert_eq!(out.summary.arms[0].errors, 1);
    assert_eq!(out.summary.arms[0].accuracy, 0.0);
    let md = std::fs::read_to_string(dir.path().join("o/report.md")).unwrap();
    assert!(md.contains("| closed_book | 1 |"), "{md}");
}

#[test]
fn gated_arms_follow_their_gate_and_report_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The probe is tied to the served weights' bytes: stand-in bytes for the in-memory model.
    let weights = d.join("tiny.gguf");
    std::fs::write(&weights, b"tiny weights").unwrap();
    let sha = ttarag::model::fingerprint::weights_sha256(&weights).unwrap();
    // S3 (retrieval harmful) most likely for every question.
    let card = common::constant_gate_for(d, [0.0, 0.0, 5.0, 0.0], &sha);
    let mut s = spec(d, 3);
    s.arms.truncate(2);
    let arms: ttarag::eval::spec::EvalSpec = toml::from_str(&format!(
        r#"
[dataset]
name = "x"
questions = "x"
collection = "x"

[[arms]]
name = "gated-skip"
mode = "gated"
gate = {{ probe = "{card}", policy = "optimistic" }}

[[arms]]
name = "gated-always"
mode = "gated"
gate = {{ probe = "{card}", policy = "always", then = "static" }}
"#,
        card = card.display()
    ))
    .unwrap();
    s.arms.extend(arms.arms);
    let mut cfg = Config::default();
    cfg.retrieval.index_dir = d.join("index");
    cfg.model.path = weights;
    let out = eval_with(&cfg, s, d.join("g")).unwrap();
    let recs: Vec<Record> = std::fs::read_to_string(d.join("g/records.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by = |arm: &str, id: &str| recs.iter().find(|r| r.arm == arm && r.id == id).unwrap();
    for id in ["q1", "q2", "q3"] {
        let skip = by("gated-skip", id);
        assert_eq!(skip.gate.as_ref().unwrap()["decision"], "skip");
        assert!(skip.retrieved.is_empty());
        assert_eq!(
            skip.output,
            by("closed_book", id).output,
            "skipped = closed book"
        );
        let always = by("gated-always", id);
        assert_eq!(always.gate.as_ref().unwrap()["decision"], "retrieve");
        assert_eq!(always.output, by("static", id).output, "retrieved = static");
        assert_eq!(always.retrieved, by("static", id).retrieved);
        assert!(always.timings_ms.gate > 0.0);
    }
    let g = |name: &str| {
        out.summary
            .arms
            .iter()
            .find(|a| a.name == name)
            .unwrap()
            .gate
            .clone()
            .unwrap()
    };
    assert_eq!(g("gated-skip").skipped, 1.0);
    assert_eq!(g("gated-always").skipped, 0.0);
    let md = std::fs::read_to_string(d.join("g/report.md")).unwrap();
    assert!(md.contains("## Gate"), "{md}");
    assert!(md.contains("| gated-skip | optimistic | 100.0 |"), "{md}");

    // A probe made for other weights is refused before any question runs.
    let other = common::constant_gate_for(&d.join("index"), [0.0; 4], "0000");
    let mut s = spec(d, 3);
    s.arms = toml::from_str::<ttarag::eval::spec::EvalSpec>(&format!(
        "[dataset]\nname = \"x\"\nquestions = \"x\"\ncollection = \"x\"\n[[arms]]\nname = \"g\"\nmode = \"gated\"\ngate = {{ probe = \"{}\" }}\n",
        other.display()
    ))
    .unwrap()
    .arms;
    let Err(e) = eval_with(&cfg, s, d.join("h")) else {
        panic!("a probe for other weights must be refused");
    };
    assert!(format!("{e:#}").contains("sha256"), "{e:#}");
}

#[test]
fn a_domain_adapter_arm_runs_on_a_valid_adapter_and_refuses_to_run_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let weights = d.join("tiny.gguf");
    std::fs::write(&weights, b"tiny weights").unwrap();
    let mut cfg = Config::default();
    cfg.retrieval.index_dir = d.join("index");
    cfg.model.path = weights.clone();
    cfg.domain.dir = d.join("adapters");
    let mut s = spec(d, 0);
    s.arms.truncate(2);
    s.arms.push(
        toml::from_str("name = \"domain\"\nmode = \"static\"\ndomain_adapter = true").unwrap(),
    );
    let err = eval_with(&cfg, s.clone(), d.join("none")).err().unwrap();
    assert!(
        format!("{err:#}").contains("needs the domain adapter of collection `facts`"),
        "{err:#}"
    );
    assert!(
        !d.join("none/records.jsonl").exists(),
        "nothing scored without it"
    );

    let sha = ttarag::model::fingerprint::weights_sha256(&weights).unwrap();
    let card = common::tiny_domain_adapter(&cfg.domain.dir, &sha);
    let out = eval_with(&cfg, s, d.join("with")).unwrap();
    assert_eq!(
        out.header.domain_adapter_sha256.as_deref(),
        Some(card.adapter_sha256.as_str())
    );
    let domain = out
        .summary
        .arms
        .iter()
        .find(|a| a.name == "domain")
        .unwrap();
    assert_eq!(domain.errors, 0);
    assert_eq!(domain.n, 3);
}
