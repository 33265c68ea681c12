//! Per-question records: one JSON line per (arm, question), appended as each finishes, so an
//! interrupted run loses at most the line being written and resumes from the rest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::engine::Timings;

/// Likelihood ranking of a question's fixed choices.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChoiceRecord {
    pub choices: Vec<String>,
    /// Mean log-probability per token of each choice as the answer (its best surface form:
    /// as written or capitalised).
    pub scores: Vec<f64>,
    pub predicted: Option<String>,
    pub correct: bool,
    /// The choice the generated answer names first, if any.
    pub mentioned: Option<String>,
}

/// What one arm did with one question.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub arm: String,
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
    pub output: String,
    /// The arm's headline metric: the likelihood-ranked choice when the question has fixed
    /// choices, else the gold answer contained in the output.
    pub correct: bool,
    pub contains: bool,
    pub exact: bool,
    pub f1: f64,
    pub choice: Option<ChoiceRecord>,
    /// Document ids of the retrieved passages, in rank order.
    pub retrieved: Vec<String>,
    /// Share of gold documents retrieved; absent without gold documents or retrieval.
    pub recall: Option<f64>,
    /// The engine's adaptation report (mode tta).
    pub tta: Option<serde_json::Value>,
    pub timings_ms: Timings,
    /// A gated arm's decision and class probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<serde_json::Value>,
    /// A gated arm's adaptation gate: its decision (adapt or skip) and probabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapt_gate: Option<serde_json::Value>,
    /// Wall time from submission to the last token (and choice scores).
    pub latency_ms: f64,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Set when the request failed; the record then counts as wrong.
    pub error: Option<String>,
}

impl Record {
    /// [`crate::adapt::TtaReport::loss_delta`], read back from a stored record (JSON holds no
    /// NaN: a non-finite loss was stored as null).
    pub fn loss_delta(&self) -> Option<f64> {
        let t = self.tta.as_ref()?;
        Some(t.get("loss_after")?.as_f64()? - t.get("loss_before")?.as_f64()?)
    }

    pub fn fallback(&self) -> Option<&str> {
        self.tta.as_ref()?.get("fallback")?.as_str()
    }
}

/// Records already written, keyed by (arm, question id).
pub type Done = HashMap<(String, String), Record>;

/// The records file of a run.
pub struct RecordLog {
    path: PathBuf,
    file: File,
}

impl RecordLog {
    /// Opens `path` for appending and returns the records already there, keyed by
    /// (arm, question id). A last line cut short by an interruption is dropped from the file.
    pub fn open(path: &Path) -> anyhow::Result<(Self, Done)> {
        let mut done = HashMap::new();
        if path.exists() {
            let f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut good_bytes = 0u64;
            let mut lines = BufReader::new(f).lines().enumerate().peekable();
            while let Some((i, line)) = lines.next() {
                let line = line.with_context(|| format!("cannot read {}", path.display()))?;
                match serde_json::from_str::<Record>(&line) {
                    Ok(r) => {
                        good_bytes += line.len() as u64 + 1;
                        done.insert((r.arm.clone(), r.id.clone()), r);
                    }
                    Err(_) if lines.peek().is_none() => {
                        tracing::warn!(line = i + 1, "dropping a record cut short");
                    }
                    Err(e) => anyhow::bail!("{}:{}: bad record: {e}", path.display(), i + 1),
                }
            }
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(good_bytes)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file,
            },
            done,
        ))
    }

    /// Appends one record and flushes it to disk before returning.
    pub fn append(&mut self, r: &Record) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(r)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}

#[cfg(test)]
pub(crate) fn sample_record(arm: &str, id: &str, correct: bool) -> Record {
    Record {
        arm: arm.into(),
        id: id.into(),
        question: "What shakes?".into(),
        answers: vec!["the ground".into()],
        output: if correct { "The ground." } else { "Water." }.into(),
        correct,
        contains: correct,
        exact: correct,
        f1: if correct { 1.0 } else { 0.0 },
        choice: None,
        retrieved: vec![],
        recall: None,
        tta: None,
        gate: None,
        adapt_gate: None,
        timings_ms: Timings::default(),
        latency_ms: 10.0,
        prompt_tokens: 5,
        completion_tokens: 2,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resumes_from_appended_records_and_drops_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        {
            let (mut log, done) = RecordLog::open(&path).unwrap();
            assert!(done.is_empty());
            log.append(&sample_record("static", "q1", true)).unwrap();
            log.append(&sample_record("tta", "q1", false)).unwrap();
        }
        // An interruption mid-write leaves half a line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"arm\": \"static\", \"id\": \"q2\", \"quest")
            .unwrap();
        drop(f);
        let (mut log, done) = RecordLog::open(&path).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(
            done[&("static".to_string(), "q1".to_string())],
            sample_record("static", "q1", true)
        );
        log.append(&sample_record("static", "q2", true)).unwrap();
        drop(log);
        let (_, done) = RecordLog::open(&path).unwrap();
        assert_eq!(
            done.len(),
            3,
            "the torn line is gone and the new one reads back"
        );
    }

    #[test]
    fn a_bad_line_in_the_middle_is_an_error_not_silently_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("records.jsonl");
        let good = serde_json::to_string(&sample_record("static", "q1", true)).unwrap();
        std::fs::write(&path, format!("garbage\n{good}\n")).unwrap();
        let err = RecordLog::open(&path).err().unwrap().to_string();
        assert!(err.contains(":1: bad record"), "{err}");
    }

    #[test]
    fn loss_delta_reads_the_adaptation_report() {
        let mut r = sample_record("tta", "q", true);
        assert_eq!(r.loss_delta(), None);
        r.tta = Some(serde_json::json!({"loss_before": 2.5, "loss_after": 2.0, "fallback": null}));
        assert_eq!(r.loss_delta(), Some(-0.5));
        assert_eq!(r.fallback(), None);
    }
}
