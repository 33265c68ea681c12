//! `ttarag eval` end to end on the real default model: every output is written, a rerun
//! resumes from the records, and a changed setting refuses to mix records.

mod common;

use ttarag::config::Config;
use ttarag::eval::dataset::Subset;
use ttarag::eval::spec::EvalSpec;
use ttarag::eval::{run, EvalJob};

fn spec(dataset: &str, extra_dataset: &str, arms: &str) -> EvalSpec {
    let root = common::root();
    let text = format!(
        r#"
[dataset]
name = "{dataset}"
questions = "{q}"
corpus = "{c}"
collection = "{dataset}"
{extra_dataset}

[run]
max_tokens = 12
top_k = 2
bootstrap_resamples = 200

{arms}
"#,
        q = root
            .join(format!("data/{dataset}/questions.jsonl"))
            .display(),
        c = root
            .join(format!("index/samples/{dataset}/corpus.jsonl"))
            .display(),
    );
    toml::from_str(&text).unwrap()
}

const ARMS: &str = r#"
[[arms]]
name = "closed_book"
mode = "closed_book"

[[arms]]
name = "static"
mode = "static"

[[arms]]
name = "tta-lora"
mode = "tta"
tta = { scope = "lora", lr = 1e-3, time_budget_ms = 0 }
"#;

fn job(spec: EvalSpec, limit: usize, out: &std::path::Path) -> EvalJob {
    EvalJob {
        spec,
        subset: Subset {
            limit: Some(limit),
            ..Default::default()
        },
        only_arms: vec![],
        out: out.to_path_buf(),
        fresh: false,
        progress: false,
    }
}

fn config(index: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.retrieval.index_dir = index.to_path_buf();
    cfg
}

#[test]
fn qasc_arms_write_every_output_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = config(&dir.path().join("index"));
    let model = common::default_model();

    let first = run(&cfg, model.clone(), job(spec("qasc", "", ARMS), 2, &out)).unwrap();
    assert_eq!((first.ran, first.resumed), (6, 0));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for arm in ["closed_book", "static", "tta-lora"] {
        assert!(md.contains(&format!("| {arm} | 2 |")), "{md}");
    }
    assert!(md.contains("## Paired with `static`"), "{md}");
    let png = std::fs::read(out.join("report.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let records = report["records"].as_array().unwrap();
    assert_eq!(records.len(), 6);
    assert_eq!(report["settings"]["arms"][2]["tta"]["lr"], 1e-3);
    for r in records {
        assert!(r["error"].is_null(), "{r}");
        let arm = r["arm"].as_str().unwrap();
        let retrieved = r["retrieved"].as_array().unwrap().len();
        if arm == "closed_book" {
            assert_eq!(retrieved, 0);
            assert!(r["recall"].is_null());
        } else {
            assert_eq!(retrieved, 2);
            let recall = r["recall"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&recall));
        }
        if arm == "tta-lora" {
            let t = &r["tta"];
            assert!(t["pairs"].as_u64().unwrap() >= 1, "{t}");
            assert!(t["loss_after"].as_f64().unwrap() < t["loss_before"].as_f64().unwrap());
            assert!(r["timings_ms"]["adapt"].as_f64().unwrap() > 0.0);
        }
    }
    let summary = &report["summary"]["arms"];
    assert_eq!(summary.as_array().unwrap().len(), 3);
    let lo = summary[1]["accuracy_ci"]["lo"].as_f64().unwrap();
    let acc = summary[1]["accuracy"].as_f64().unwrap();
    assert!(lo <= acc);

    // A larger run over the same folder computes only the new question.
    let second = run(&cfg, model.clone(), job(spec("qasc", "", ARMS), 3, &out)).unwrap();
    assert_eq!((second.ran, second.resumed), (3, 6));
    let lines = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 9);

    // Changing how an arm adapts would mix incomparable records: refused.
    let changed = ARMS.replace("lr = 1e-3", "lr = 1e-2");
    let err = run(&cfg, model, job(spec("qasc", "", &changed), 3, &out))
        .err()
        .expect("a changed arm is refused");
    assert!(
        format!("{err:#}").contains("different setting of arm `tta-lora`"),
        "{err:#}"
    );
}

#[test]
fn pubmedqa_choices_are_ranked_by_likelihood() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let cfg = config(&dir.path().join("index"));
    let arms = "[[arms]]\nname = \"static\"\nmode = \"static\"\n";
    let s = spec("pubmedqa", "choices = [\"yes\", \"no\", \"maybe\"]", arms);
    let outcome = run(&cfg, common::default_model(), job(s, 2, &out)).unwrap();
    assert_eq!(outcome.ran, 2);
    let a = &outcome.summary.arms[0];
    assert!(a.choice.is_some());
    let text = std::fs::read_to_string(out.join("records.jsonl")).unwrap();
    let mut recalls = Vec::new();
    for line in text.lines() {
        let r: ttarag::eval::record::Record = serde_json::from_str(line).unwrap();
        let c = r.choice.expect("choice record");
        assert_eq!(c.scores.len(), 3);
        assert!(c.scores.iter().all(|s| s.is_finite() && *s < 0.0), "{c:?}");
        let best = c.predicted.clone().unwrap();
        assert_eq!(r.correct, r.answers.contains(&best));
        recalls.push(r.recall.expect("gold documents are known"));
    }
    // The first question's own abstract is the top BM25 hit; the second's is not.
    assert_eq!(recalls, vec![1.0, 0.0]);
    assert_eq!(a.recall, Some(0.5));
}
