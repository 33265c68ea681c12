//! Gate training labels from evaluation records: a question answered both by an arm without
//! retrieval and by an arm with it gets its MMA-RAG class (see [`crate::gate::policy::class_of`]).
//! When the `without` arm retrieves too and the `with` arm adapts, the same classes say
//! whether adaptation helps: the probe becomes an adaptation gate ([`decides`]).
//! Hand-labelled extra questions (chit-chat, say) join them from a JSONL file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::eval::record::Record;
use crate::gate::card::Decides;
use crate::gate::policy::{class_of, CLASSES};
use crate::model::ChatMessage;

/// One labelled question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Labelled {
    pub id: String,
    pub question: String,
    pub class: usize,
}

/// Reads the records of an eval run: its `records.jsonl` or `report.json`.
pub fn read_records(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read records {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "json") {
        #[derive(Deserialize)]
        struct Report {
            records: Vec<Record>,
        }
        let r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an eval report", path.display()))?;
        return Ok(r.records);
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not an eval record", path.display(), i + 1))
        })
        .collect()
}

/// Pairs each question's `without` and `with` records into a class. Questions missing either
/// arm, or where either failed, are left out; the count of each is returned for the report.
pub fn label(records: &[Record], without: &str, with: &str) -> (Vec<Labelled>, usize) {
    let mut by_id: HashMap<&str, (Option<&Record>, Option<&Record>)> = HashMap::new();
    let mut order = Vec::new();
    for r in records {
        let slot = if r.arm == without {
            0
        } else if r.arm == with {
            1
        } else {
            continue;
        };
        let e = by_id.entry(r.id.as_str()).or_insert_with(|| {
            order.push(r.id.as_str());
            (None, None)
        });
        if slot == 0 {
            e.0 = Some(r);
        } else {
            e.1 = Some(r);
        }
    }
    let mut out = Vec::new();
    let mut skipped = 0;
    for id in order {
        match by_id[id] {
            (Some(a), Some(b)) if a.error.is_none() && b.error.is_none() => out.push(Labelled {
                id: id.to_string(),
                question: a.question.clone(),
                class: class_of(a.correct, b.correct),
            }),
            _ => skipped += 1,
        }
    }
    (out, skipped)
}

/// What a probe trained on `without` against `with` decides, read from the arms' records:
/// retrieval when `without` never retrieved, adaptation when it did and `with` adapted.
pub fn decides(records: &[Record], without: &str, with: &str) -> anyhow::Result<Decides> {
    let answered = |arm: &str, test: fn(&Record) -> bool| {
        records
            .iter()
            .any(|r| r.arm == arm && r.error.is_none() && test(r))
    };
    if !answered(without, |r| !r.retrieved.is_empty()) {
        return Ok(Decides::Retrieval);
    }
    anyhow::ensure!(
        answered(with, |r| r.tta.is_some()),
        "`{without}` retrieves, so `{with}` must adapt (mode tta): the classes would then say \
         whether adaptation helps; for a retrieval gate, `--without` is an arm without retrieval"
    );
    Ok(Decides::Adaptation)
}

/// Examples from one run's records, and what their classes decide.
#[derive(Debug)]
pub struct RunExamples {
    pub examples: Vec<Example>,
    /// Questions lacking either arm, or where either failed.
    pub skipped: usize,
    pub decides: Decides,
}

/// One question of the gate's training set, as the model would see it without retrieval.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Where the label came from: the records file or the extra file.
    pub source: String,
    pub id: String,
    /// System prompt (if any) and the question.
    pub messages: Vec<ChatMessage>,
    pub class: usize,
    /// The collection and top-k the run retrieved with (records only), so the post pass sees
    /// the passages that were answered from.
    pub retrieval: Option<(String, usize)>,
}

fn messages(system: Option<&str>, question: &str) -> Vec<ChatMessage> {
    let mut m = Vec::new();
    if let Some(s) = system.filter(|s| !s.is_empty()) {
        m.push(ChatMessage::new("system", s));
    }
    m.push(ChatMessage::new("user", question));
    m
}

/// Labelled examples from one eval run's records. The run's system prompt is read from the
/// `run.json` beside the records (absent = none), so features see the prompt that was answered.
pub fn examples_from_run(records: &Path, without: &str, with: &str) -> anyhow::Result<RunExamples> {
    let recs = read_records(records)?;
    let decides = decides(&recs, without, with).with_context(|| records.display().to_string())?;
    let run_file = records.with_file_name("run.json");
    let run: serde_json::Value = if run_file.exists() {
        serde_json::from_str(&std::fs::read_to_string(&run_file)?)
            .with_context(|| format!("{}: not JSON", run_file.display()))?
    } else {
        serde_json::Value::Null
    };
    let system = run["dataset"]["system"].as_str().map(String::from);
    let collection = run["dataset"]["collection"].as_str();
    // The `with` arm's own top-k, else the run's.
    let arm_k = run["arms"].as_array().and_then(|arms| {
        arms.iter()
            .find(|a| a["name"] == with)
            .and_then(|a| a["top_k"].as_u64())
    });
    let top_k = arm_k.or(run["run"]["top_k"].as_u64());
    let retrieval = collection
        .zip(top_k)
        .map(|(c, k)| (c.to_string(), k as usize));
    let (labelled, skipped) = label(&recs, without, with);
    anyhow::ensure!(
        !labelled.is_empty(),
        "{}: no question was answered by both `{without}` and `{with}`",
        records.display()
    );
    let source = records.display().to_string();
    let examples = labelled
        .into_iter()
        .map(|l| Example {
            source: source.clone(),
            id: l.id,
            messages: messages(system.as_deref(), &l.question),
            class: l.class,
            retrieval: retrieval.clone(),
        })
        .collect();
    Ok(RunExamples {
        examples,
        skipped,
        decides,
    })
}

/// Hand-labelled examples: JSONL rows `{"id", "question", "class": "S1".."S4", "system"?}`.
pub fn examples_from_jsonl(path: &Path) -> anyhow::Result<Vec<Example>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Row {
        id: String,
        question: String,
        class: String,
        #[serde(default)]
        system: Option<String>,
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let source = path.display().to_string();
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let at = || format!("{}:{}", path.display(), i + 1);
            let r: Row = serde_json::from_str(l).with_context(|| format!("{}: bad row", at()))?;
            let class = CLASSES
                .iter()
                .position(|c| *c == r.class)
                .with_context(|| {
                    format!("{}: class `{}` is not one of {CLASSES:?}", at(), r.class)
                })?;
            Ok(Example {
                source: source.clone(),
                id: r.id,
                messages: messages(r.system.as_deref(), &r.question),
                class,
                retrieval: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::record::sample_record;
    use crate::gate::policy::{S1, S2, S3, S4};

    #[test]
    fn classes_follow_both_outcomes_and_incomplete_questions_are_skipped() {
        let mut recs = vec![
            sample_record("closed_book", "a", false),
            sample_record("static", "a", true),
            sample_record("closed_book", "b", true),
            sample_record("static", "b", false),
            sample_record("closed_book", "c", true),
            sample_record("static", "c", true),
            sample_record("static", "d", false),
            sample_record("closed_book", "d", false),
            sample_record("tta", "d", true),
            sample_record("closed_book", "e", false),
        ];
        let mut failed = sample_record("static", "f", false);
        failed.error = Some("context".into());
        recs.push(sample_record("closed_book", "f", false));
        recs.push(failed);
        let (l, skipped) = label(&recs, "closed_book", "static");
        let got: Vec<(&str, usize)> = l.iter().map(|x| (x.id.as_str(), x.class)).collect();
        assert_eq!(got, vec![("a", S2), ("b", S3), ("c", S4), ("d", S1)]);
        assert_eq!(skipped, 2, "e has no retrieval answer, f failed");
        let (t, _) = label(&recs, "closed_book", "tta");
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].class, S2);
    }

    #[test]
    fn the_arms_records_say_whether_the_probe_decides_retrieval_or_adaptation() {
        let with_passages = |arm: &str, id: &str, adapted: bool| {
            let mut r = sample_record(arm, id, true);
            r.retrieved = vec!["doc-1".into()];
            r.tta = adapted.then(|| serde_json::json!({"loss_before": 3.0}));
            r
        };
        let recs = vec![
            sample_record("closed_book", "a", false),
            with_passages("static", "a", false),
            with_passages("tta", "a", true),
        ];
        assert_eq!(
            decides(&recs, "closed_book", "static").unwrap(),
            Decides::Retrieval
        );
        assert_eq!(
            decides(&recs, "closed_book", "tta").unwrap(),
            Decides::Retrieval
        );
        assert_eq!(
            decides(&recs, "static", "tta").unwrap(),
            Decides::Adaptation
        );
        let e = decides(&recs, "tta", "static").unwrap_err().to_string();
        assert!(e.contains("must adapt"), "{e}");
        // A failed record says nothing about its arm.
        let mut failed = with_passages("static", "b", false);
        failed.error = Some("timeout".into());
        let only_failed = vec![failed, with_passages("tta", "b", true)];
        assert_eq!(
            decides(&only_failed, "static", "tta").unwrap(),
            Decides::Retrieval
        );
    }

    #[test]
    fn reads_records_files_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let recs = vec![
            sample_record("closed_book", "a", false),
            sample_record("static", "a", true),
        ];
        let jsonl = dir.path().join("records.jsonl");
        let lines: Vec<String> = recs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        std::fs::write(&jsonl, lines.join("\n") + "\n").unwrap();
        assert_eq!(read_records(&jsonl).unwrap(), recs);
        let json = dir.path().join("report.json");
        std::fs::write(
            &json,
            serde_json::to_string(&serde_json::json!({"records": recs})).unwrap(),
        )
        .unwrap();
        assert_eq!(read_records(&json).unwrap(), recs);
        std::fs::write(&jsonl, "{}\n").unwrap();
        assert!(read_records(&jsonl)
            .unwrap_err()
            .to_string()
            .contains(":1:"));
    }

    #[test]
    fn examples_carry_the_run_system_prompt_and_extra_rows_their_class() {
        let dir = tempfile::tempdir().unwrap();
        let recs = [
            sample_record("closed_book", "a", false),
            sample_record("static", "a", true),
        ];
        let jsonl = dir.path().join("records.jsonl");
        let lines: Vec<String> = recs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        std::fs::write(&jsonl, lines.join("\n")).unwrap();
        let run = examples_from_run(&jsonl, "closed_book", "static").unwrap();
        let ex = run.examples;
        assert_eq!((ex.len(), run.skipped, ex[0].class), (1, 0, S2));
        assert_eq!(ex[0].messages.len(), 1, "no run.json, no system prompt");
        assert_eq!(ex[0].retrieval, None);
        std::fs::write(
            dir.path().join("run.json"),
            r#"{"dataset": {"system": "Answer briefly.", "collection": "qasc"},
                "run": {"top_k": 3}, "arms": [{"name": "static", "top_k": 5}]}"#,
        )
        .unwrap();
        let ex = examples_from_run(&jsonl, "closed_book", "static")
            .unwrap()
            .examples;
        assert_eq!(ex[0].messages[0].content, "Answer briefly.");
        assert_eq!(ex[0].retrieval, Some(("qasc".to_string(), 5)));
        assert_eq!(ex[0].messages[1].role, "user");
        assert!(examples_from_run(&jsonl, "closed_book", "tta").is_err());

        let extra = dir.path().join("extra.jsonl");
        std::fs::write(
            &extra,
            "{\"id\": \"hi\", \"question\": \"Hello!\", \"class\": \"S3\"}\n\n",
        )
        .unwrap();
        let ex = examples_from_jsonl(&extra).unwrap();
        assert_eq!((ex.len(), ex[0].class), (1, S3));
        std::fs::write(
            &extra,
            "{\"id\": \"x\", \"question\": \"?\", \"class\": \"S9\"}\n",
        )
        .unwrap();
        let e = examples_from_jsonl(&extra).unwrap_err().to_string();
        assert!(e.contains(":1") && e.contains("S9"), "{e}");
    }
}
