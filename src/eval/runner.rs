//! Runs every arm on every question through the same engine the server uses, scores the
//! answers and appends a record per (arm, question).

use std::collections::HashMap;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::dataset::Question;
use super::record::{ChoiceRecord, Done, Record, RecordLog};
use super::score::{argmax, contains_answer, exact_match, first_choice_mentioned, token_f1};
use super::spec::{DatasetSpec, EvalSpec, ResolvedArm, RunSpec};
use crate::engine::{
    resolve_tta, ChatJob, Completion, Engine, EngineError, Event, RagParams, Ticket, TtaOverrides,
};
use crate::generate::GenParams;
use crate::model::ChatMessage;

/// A stable per-question seed: the same question gets the same sampling and LoRA
/// initialisation whatever the subset or the order in which a resumed run reaches it.
pub fn question_seed(run_seed: u64, id: &str) -> u64 {
    super::dataset::stable_hash(id) ^ run_seed
}

/// The passage id without its `#n` part: the document it was cut from.
fn doc_id(passage_id: &str) -> &str {
    match passage_id.rsplit_once('#') {
        Some((doc, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => doc,
        _ => passage_id,
    }
}

fn job(
    ds: &DatasetSpec,
    run: &RunSpec,
    arm: &ResolvedArm,
    q: &Question,
) -> anyhow::Result<ChatJob> {
    let seed = question_seed(run.seed, &q.id);
    let mut messages = Vec::new();
    if let Some(s) = &ds.system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", &q.question));
    let tta = match &arm.tta {
        Some(section) => Some(
            resolve_tta(section, &TtaOverrides::default(), seed)
                .map_err(|e| anyhow::anyhow!("arm `{}`: {}", arm.name, e.message))?,
        ),
        None => None,
    };
    Ok(ChatJob {
        messages,
        gen: GenParams {
            max_tokens: run.max_tokens,
            temperature: run.temperature,
            top_p: run.top_p,
            seed,
            stop: vec![],
        },
        rag: RagParams {
            mode: arm.rag_mode(),
            collection: ds.collection.clone(),
            top_k: arm.top_k,
            gate: arm.gate.as_ref().map(|g| g.policy),
            adapt_gate: arm
                .gate
                .as_ref()
                .and_then(|g| g.adapt.as_ref().map(|a| a.policy)),
            domain: match arm.domain_adapter {
                true => crate::engine::DomainUse::Require,
                false => crate::engine::DomainUse::Off,
            },
            cite: false,
        },
        tta,
    })
}

/// The surface forms scored for each choice, with the choice each belongs to: as written and
/// capitalised, since a chat model starts its answer with "Yes" far more often than "yes".
pub fn choice_variants(choices: &[String]) -> (Vec<String>, Vec<usize>) {
    let mut forms = Vec::new();
    let mut owner = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        let mut chars = c.chars();
        let cap: String = match chars.next() {
            Some(f) => f.to_uppercase().chain(chars).collect(),
            None => String::new(),
        };
        for f in [c.clone(), cap] {
            if !forms.iter().zip(&owner).any(|(x, &o)| *x == f && o == i) {
                forms.push(f);
                owner.push(i);
            }
        }
    }
    (forms, owner)
}

/// Submits a job and waits for its end.
pub fn complete(engine: &Engine, job: ChatJob) -> Result<Completion, String> {
    wait(engine.submit(job))
}

/// Waits for a submitted job's end.
fn wait(submitted: Result<Ticket, EngineError>) -> Result<Completion, String> {
    let mut rx = submitted.map_err(|e| e.to_string())?;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Text(_) => {}
            Event::Done(c) => return Ok(*c),
            Event::Error(e) => return Err(e.to_string()),
        }
    }
    Err("the engine stopped before answering".into())
}

/// Scores a completion (or a failure) into a record.
pub fn score(
    arm: &str,
    q: &Question,
    choices: &[String],
    result: Result<Completion, String>,
    latency_ms: f64,
) -> Record {
    let mut r = Record {
        arm: arm.to_string(),
        id: q.id.clone(),
        question: q.question.clone(),
        answers: q.answers.clone(),
        output: String::new(),
        correct: false,
        contains: false,
        exact: false,
        f1: 0.0,
        choice: None,
        retrieved: vec![],
        recall: None,
        tta: None,
        gate: None,
        adapt_gate: None,
        timings_ms: Default::default(),
        latency_ms,
        prompt_tokens: 0,
        completion_tokens: 0,
        error: None,
    };
    let c = match result {
        Ok(c) => c,
        Err(e) => {
            r.error = Some(e);
            return r;
        }
    };
    r.contains = contains_answer(&c.text, &q.answers);
    r.exact = exact_match(&c.text, &q.answers);
    r.f1 = token_f1(&c.text, &q.answers);
    r.correct = r.contains;
    if !choices.is_empty() {
        // A choice scores as its best surface form.
        let owner = choice_variants(choices).1;
        let mut scores = vec![f64::NEG_INFINITY; choices.len()];
        for (s, &o) in c.choice_scores.iter().zip(&owner) {
            scores[o] = scores[o].max(s.mean());
        }
        let predicted = argmax(&scores).map(|i| choices[i].clone());
        let correct = predicted
            .as_ref()
            .is_some_and(|p| exact_match(p, &q.answers));
        r.correct = correct;
        r.choice = Some(ChoiceRecord {
            choices: choices.to_vec(),
            scores,
            predicted,
            correct,
            mentioned: first_choice_mentioned(&c.text, choices).map(|i| choices[i].clone()),
        });
    }
    r.retrieved = c
        .rag
        .passages
        .iter()
        .map(|p| {
            // The index stores each passage's document; collections without it name it in the
            // passage id.
            p.document
                .clone()
                .unwrap_or_else(|| doc_id(&p.id).to_string())
        })
        .collect();
    if !q.gold_doc_ids.is_empty() && c.rag.collection.is_some() {
        let found = q
            .gold_doc_ids
            .iter()
            .filter(|g| r.retrieved.iter().any(|d| d == *g))
            .count();
        r.recall = Some(found as f64 / q.gold_doc_ids.len() as f64);
    }
    r.tta = c
        .rag
        .tta
        .as_ref()
        .and_then(|t| serde_json::to_value(t).ok());
    r.gate = c
        .rag
        .gate
        .as_ref()
        .and_then(|g| serde_json::to_value(g).ok());
    r.adapt_gate = c
        .rag
        .adapt_gate
        .as_ref()
        .and_then(|g| serde_json::to_value(g).ok());
    r.timings_ms = c.rag.timings_ms.clone();
    r.prompt_tokens = c.prompt_tokens;
    r.completion_tokens = c.completion_tokens;
    r.output = c.text;
    r
}

/// Runs what is missing from `done` and returns every record of the selected questions and
/// arms, in question then arm order.
pub fn run_all(
    engine: &Engine,
    spec: &EvalSpec,
    arms: &[ResolvedArm],
    questions: &[Question],
    log: &mut RecordLog,
    mut done: Done,
    progress: bool,
) -> anyhow::Result<Vec<Record>> {
    let (ds, run) = (&spec.dataset, &spec.run);
    let total = (questions.len() * arms.len()) as u64;
    let pb = if progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} ETA {eta_precise} {msg}",
        )?
        .progress_chars("=> "),
    );
    let mut right: HashMap<&str, (usize, usize)> = HashMap::new();
    let mut out = Vec::with_capacity(total as usize);
    for q in questions {
        let choices = if q.choices.is_empty() {
            &ds.choices
        } else {
            &q.choices
        };
        for arm in arms {
            let key = (arm.name.clone(), q.id.clone());
            let rec = match done.remove(&key) {
                Some(r) => r,
                None => {
                    let job = job(ds, run, arm, q)?;
                    let forms = choice_variants(choices).0;
                    let t = Instant::now();
                    let result = wait(engine.submit_scored(job, forms));
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    let r = score(&arm.name, q, choices, result, ms);
                    if let Some(e) = &r.error {
                        tracing::warn!(arm = %arm.name, id = %q.id, error = %e, "question failed");
                    }
                    log.append(&r)?;
                    r
                }
            };
            let e = right.entry(arm.name.as_str()).or_default();
            e.0 += rec.correct as usize;
            e.1 += 1;
            out.push(rec);
            pb.inc(1);
        }
        let msg: Vec<String> = arms
            .iter()
            .map(|a| {
                let (r, n) = right.get(a.name.as_str()).copied().unwrap_or_default();
                format!("{} {:.1}%", a.name, 100.0 * r as f64 / n.max(1) as f64)
            })
            .collect();
        pb.set_message(msg.join("  "));
    }
    pb.finish();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_seeds_are_stable_and_distinct() {
        assert_eq!(question_seed(0, "qasc-1"), question_seed(0, "qasc-1"));
        assert_ne!(question_seed(0, "qasc-1"), question_seed(0, "qasc-2"));
        assert_ne!(question_seed(0, "qasc-1"), question_seed(1, "qasc-1"));
        // FNV-1a of the empty string is its offset basis.
        assert_eq!(question_seed(0, ""), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn choices_are_scored_as_written_and_capitalised() {
        let c = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (forms, owner) = choice_variants(&c(&["yes", "No", "élan"]));
        assert_eq!(forms, c(&["yes", "Yes", "No", "élan", "Élan"]));
        assert_eq!(owner, vec![0, 0, 1, 2, 2]);
    }

    #[test]
    fn passage_ids_map_to_their_documents() {
        assert_eq!(doc_id("pmid-1#3"), "pmid-1");
        assert_eq!(doc_id("qasc-abc"), "qasc-abc");
        assert_eq!(doc_id("notes#intro"), "notes#intro");
        assert_eq!(doc_id("x#"), "x#");
    }
}
