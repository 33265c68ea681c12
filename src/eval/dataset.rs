//! QA sets in the `questions.jsonl` format: one `{"id", "question", "answers": [..],
//! "gold_doc_ids"?: [..], "choices"?: [..]}` object per line; unknown keys are ignored.

use std::path::Path;

use anyhow::{bail, Context};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

/// One question of a QA set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Question {
    pub id: String,
    pub question: String,
    pub answers: Vec<String>,
    #[serde(default)]
    pub gold_doc_ids: Vec<String>,
    /// Fixed answer choices of this question; empty when answers are free text.
    #[serde(default)]
    pub choices: Vec<String>,
}

/// Reads a questions file; a malformed line is an error naming its line number.
pub fn load_questions(path: &Path) -> anyhow::Result<Vec<Question>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read questions file {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q: Question = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a question object", path.display(), i + 1))?;
        if q.question.trim().is_empty() {
            bail!("{}:{}: empty question", path.display(), i + 1);
        }
        if q.answers.is_empty() {
            bail!("{}:{}: no answers", path.display(), i + 1);
        }
        if !seen.insert(q.id.clone()) {
            bail!("{}:{}: duplicate id `{}`", path.display(), i + 1, q.id);
        }
        out.push(q);
    }
    if out.is_empty() {
        bail!("{}: no questions", path.display());
    }
    Ok(out)
}

/// A fixed split of a QA set by question id: settings are tuned on `dev` and reported on
/// `test`, so a tuned default is never judged on the questions that chose it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    #[default]
    All,
    /// One question in five, by a stable hash of its id.
    Dev,
    /// The other four in five.
    Test,
    /// Four in five of `dev` (by a second digit of the same hash): what a trained artefact
    /// (a supervised domain adapter) learns from.
    #[serde(rename = "dev-train")]
    DevTrain,
    /// The other fifth of `dev`: where settings of a trained artefact are compared.
    #[serde(rename = "dev-eval")]
    DevEval,
}

impl Part {
    pub fn holds(self, id: &str) -> bool {
        let h = stable_hash(id);
        let dev = h.is_multiple_of(5);
        let dev_eval = dev && (h / 5).is_multiple_of(5);
        match self {
            Part::All => true,
            Part::Dev => dev,
            Part::Test => !dev,
            Part::DevTrain => dev && !dev_eval,
            Part::DevEval => dev_eval,
        }
    }
}

/// Stable across Rust releases and platforms, so splits and seeds derived from ids never move.
pub fn stable_hash(s: &str) -> u64 {
    crate::stable_hash::fnv1a(s.as_bytes())
}

/// Which questions a run covers.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Subset {
    /// Applied first.
    #[serde(default)]
    pub part: Part,
    /// The first `limit` questions (after sampling, if any).
    pub limit: Option<usize>,
    /// A random sample of this many questions, drawn with `seed`, kept in file order.
    pub sample: Option<usize>,
    pub seed: u64,
}

/// Applies `subset` to `questions`; the same subset of the same file always selects the same
/// questions, so a resumed run and a rerun see the same set.
pub fn select(mut questions: Vec<Question>, subset: &Subset) -> Vec<Question> {
    questions.retain(|q| subset.part.holds(&q.id));
    if let Some(n) = subset.sample {
        if n < questions.len() {
            let mut idx: Vec<usize> = (0..questions.len()).collect();
            let mut rng = rand::rngs::StdRng::seed_from_u64(subset.seed);
            idx.shuffle(&mut rng);
            let mut keep: Vec<usize> = idx.into_iter().take(n).collect();
            keep.sort_unstable();
            let mut slots: Vec<Option<Question>> = questions.into_iter().map(Some).collect();
            questions = keep.into_iter().filter_map(|i| slots[i].take()).collect();
        }
    }
    if let Some(n) = subset.limit {
        questions.truncate(n);
    }
    questions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qs(n: usize) -> Vec<Question> {
        (0..n)
            .map(|i| Question {
                id: format!("q{i}"),
                question: format!("question {i}?"),
                answers: vec!["a".into()],
                gold_doc_ids: vec![],
                choices: vec![],
            })
            .collect()
    }

    #[test]
    fn sampling_is_deterministic_ordered_and_seed_dependent() {
        let s = Subset {
            sample: Some(10),
            seed: 3,
            limit: None,
            part: Part::All,
        };
        let a = select(qs(100), &s);
        let b = select(qs(100), &s);
        assert_eq!(a, b);
        assert_eq!(a.len(), 10);
        let pos: Vec<usize> = a.iter().map(|q| q.id[1..].parse().unwrap()).collect();
        assert!(
            pos.windows(2).all(|w| w[0] < w[1]),
            "file order kept: {pos:?}"
        );
        let c = select(qs(100), &Subset { seed: 4, ..s });
        assert_ne!(a, c);
        let limited = select(
            qs(100),
            &Subset {
                limit: Some(3),
                ..s
            },
        );
        assert_eq!(limited, a[..3].to_vec());
        assert_eq!(select(qs(5), &s).len(), 5);
    }

    #[test]
    fn dev_train_and_dev_eval_split_dev_without_overlap() {
        let part = |p| {
            select(
                qs(5000),
                &Subset {
                    part: p,
                    ..Default::default()
                },
            )
        };
        let (dev, train, eval) = (part(Part::Dev), part(Part::DevTrain), part(Part::DevEval));
        assert_eq!(train.len() + eval.len(), dev.len());
        assert!(train.iter().chain(&eval).all(|q| dev.contains(q)));
        assert!(eval.iter().all(|q| !train.contains(q)));
        let share = eval.len() as f64 / dev.len() as f64;
        assert!((0.12..0.28).contains(&share), "{share}");
    }

    #[test]
    fn dev_and_test_parts_split_about_one_to_four_without_overlap() {
        let all = qs(1000);
        let dev = select(
            all.clone(),
            &Subset {
                part: Part::Dev,
                ..Default::default()
            },
        );
        let test = select(
            all.clone(),
            &Subset {
                part: Part::Test,
                ..Default::default()
            },
        );
        assert_eq!(dev.len() + test.len(), 1000);
        assert!((150..250).contains(&dev.len()), "{}", dev.len());
        assert!(dev.iter().all(|q| !test.contains(q)));
        // The split depends on the id only: a sample of the test part stays in it.
        let s = select(
            all,
            &Subset {
                sample: Some(50),
                seed: 1,
                limit: None,
                part: Part::Test,
            },
        );
        assert!(s.iter().all(|q| test.contains(q)));
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn reads_the_shared_format_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"id\": \"1\", \"question\": \"Can it?\", \"answers\": [\"yes\"], \"long_answer\": \"x\"}\n\n{\"id\": \"2\", \"question\": \"What?\", \"answers\": [\"b\"], \"gold_doc_ids\": [\"d\"], \"choices\": [\"a\", \"b\"]}\n",
        )
        .unwrap();
        let q = load_questions(&p).unwrap();
        assert_eq!(q.len(), 2);
        assert_eq!(q[1].gold_doc_ids, vec!["d"]);
        assert_eq!(q[1].choices, vec!["a", "b"]);
        std::fs::write(
            &p,
            "{\"id\": \"1\", \"question\": \"Q?\", \"answers\": [\"a\"]}\nnot json\n",
        )
        .unwrap();
        let e = format!("{:#}", load_questions(&p).unwrap_err());
        assert!(e.contains(":2:"), "{e}");
        std::fs::write(
            &p,
            "{\"id\": \"1\", \"question\": \"Q?\", \"answers\": []}\n",
        )
        .unwrap();
        assert!(format!("{:#}", load_questions(&p).unwrap_err()).contains("no answers"));
        std::fs::write(&p, "{\"id\": \"1\", \"question\": \"Q?\", \"answers\": [\"a\"]}\n{\"id\": \"1\", \"question\": \"R?\", \"answers\": [\"a\"]}\n").unwrap();
        assert!(format!("{:#}", load_questions(&p).unwrap_err()).contains("duplicate"));
    }
}
