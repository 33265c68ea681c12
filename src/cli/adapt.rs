//! `ttarag index adapt`: trains a collection's domain adapter from labelled questions (their
//! retrieved passages in the prompt exactly as a request builds it, the gold answer as the
//! target: RAFT-style supervision) and/or the collection's own passages (next-token loss).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::adapt::domain::{
    adapter_dir, examples_sha256, save_adapter, train_domain, DomainCard, Shape, TrainingData,
    CARD_FORMAT,
};
use crate::adapt::Example;
use crate::config::Config;
use crate::engine::RagPrompt;
use crate::eval::dataset::{load_questions, Part, Question};
use crate::eval::score::normalize;
use crate::model::{ChatMessage, Model};
use crate::retrieval::{Collection, Passage};

#[derive(Debug, Args)]
pub struct AdaptArgs {
    /// Collection to adapt to.
    #[arg(long)]
    pub collection: String,
    /// Labelled questions (the eval's questions.jsonl). Without it, the adapter learns the
    /// collection's passages as plain text.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Split of the questions file to train on. Questions whose text also appears outside it
    /// (some sets repeat a question under several ids) are left out.
    #[arg(long, value_enum, default_value_t = Part::DevTrain)]
    pub part: Part,
    /// System message of the training prompts: what requests to this collection will send.
    #[arg(long)]
    pub system: Option<String>,
    /// Passages per prompt. Default: retrieval.top_k.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Train on the first N questions of the part only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Start over, discarding the checkpoint of an unfinished run.
    #[arg(long)]
    pub fresh: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// The labelled questions of `part`, without any whose normalised text occurs outside it.
fn training_questions(all: Vec<Question>, part: Part) -> (Vec<Question>, usize) {
    let outside: std::collections::HashSet<String> = all
        .iter()
        .filter(|q| !part.holds(&q.id))
        .map(|q| normalize(&q.question))
        .collect();
    let inside: Vec<Question> = all.into_iter().filter(|q| part.holds(&q.id)).collect();
    let n = inside.len();
    let kept: Vec<Question> = inside
        .into_iter()
        .filter(|q| !outside.contains(&normalize(&q.question)))
        .collect();
    let excluded = n - kept.len();
    (kept, excluded)
}

/// A labelled example: the request's own prompt, then the answer and the end of the turn.
fn question_example(
    model: &Model,
    prompt: &RagPrompt,
    system: Option<&str>,
    q: &Question,
    passages: &[Passage],
) -> Result<Example> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage::new("system", s));
    }
    messages.push(ChatMessage::new("user", &q.question));
    let messages = prompt.apply(&messages, passages)?;
    let mut ids = model.encode_chat(&messages)?.ids;
    let suffix_start = ids.len();
    ids.extend(model.tokenizer.encode_text(&q.answers[0])?);
    ids.extend(model.eos_ids.first());
    Ok(Example { ids, suffix_start })
}

/// Examples of plain passage text: every token predicted from the ones before it.
fn corpus_example(model: &Model, p: &Passage, max_tokens: usize) -> Result<Option<Example>> {
    let mut ids = model.tokenizer.encode_text(&p.text)?;
    ids.truncate(max_tokens);
    Ok((ids.len() >= 2).then_some(Example {
        ids,
        suffix_start: 1,
    }))
}

struct Built {
    examples: Vec<Example>,
    data: TrainingData,
    too_long: usize,
}

fn build_examples(
    cfg: &Config,
    model: &Model,
    coll: &Collection,
    a: &AdaptArgs,
    top_k: usize,
) -> Result<Built> {
    let s = &cfg.domain.train;
    let mut rng = rand::rngs::StdRng::seed_from_u64(s.seed);
    let mut examples = Vec::new();
    let (mut too_long, mut questions, mut excluded) = (0, 0, 0);
    if let Some(path) = &a.questions {
        let (mut qs, ex) = training_questions(load_questions(path)?, a.part);
        excluded = ex;
        if let Some(n) = a.limit {
            qs.truncate(n);
        }
        if qs.is_empty() {
            bail!("{}: no questions in part {:?}", path.display(), a.part);
        }
        let prompt = RagPrompt::new(&cfg.retrieval.prompt_template)?;
        let retrieved: Vec<Vec<Passage>> = qs
            .iter()
            .map(|q| coll.search(&q.question, top_k))
            .collect::<Result<_, _>>()?;
        for (i, q) in qs.iter().enumerate() {
            // RAFT's distractor-only examples: another question's passages, none of this one's.
            let passages = if qs.len() > 1 && rng.random::<f64>() < s.distractor_share {
                let j = (i + rng.random_range(1..qs.len())) % qs.len();
                &retrieved[j]
            } else {
                &retrieved[i]
            };
            let ex = question_example(model, &prompt, a.system.as_deref(), q, passages)?;
            if ex.ids.len() > s.max_tokens {
                too_long += 1;
                continue;
            }
            examples.push(ex);
        }
        questions = examples.len();
    }
    let passages = coll.passages()?;
    let corpus: Vec<&Passage> = match a.questions {
        None => passages.iter().collect(),
        Some(_) => {
            let n = (s.corpus_per_question * questions as f64).round() as usize;
            passages
                .choose_multiple(&mut rng, n.min(passages.len()))
                .collect()
        }
    };
    let mut corpus_examples = 0;
    for p in corpus {
        if let Some(ex) = corpus_example(model, p, s.max_tokens)? {
            examples.push(ex);
            corpus_examples += 1;
        }
    }
    if examples.is_empty() {
        bail!("no training examples (collection empty, or every question over domain.train.max_tokens)");
    }
    // Mixed kinds are interleaved by the trainer's own shuffle; this one only fixes the order
    // the digest sees.
    examples.shuffle(&mut rand::rngs::StdRng::seed_from_u64(s.seed));
    let data = TrainingData {
        questions,
        questions_file: a.questions.as_ref().map(|p| p.display().to_string()),
        questions_excluded: excluded,
        corpus_examples,
        examples_sha256: examples_sha256(&examples),
    };
    Ok(Built {
        examples,
        data,
        too_long,
    })
}

pub fn run(cfg: Config, a: AdaptArgs) -> Result<()> {
    let s = cfg.domain.train.clone();
    s.validate()?;
    let cols = super::open_collections(&cfg)?;
    let coll = cols.get(&a.collection).context("see `ttarag index list`")?;
    let top_k = a.top_k.unwrap_or(cfg.retrieval.top_k);
    let model = super::load_model(&cfg)?;
    let t0 = Instant::now();
    let built = build_examples(&cfg, &model, &coll, &a, top_k)?;
    let tokens: usize = built.examples.iter().map(|e| e.ids.len()).sum();
    println!(
        "{}: {} labelled questions ({} left out as repeated outside part {:?}, {} over {} tokens), {} corpus passages; {} tokens",
        a.collection,
        built.data.questions,
        built.data.questions_excluded,
        a.part,
        built.too_long,
        s.max_tokens,
        built.data.corpus_examples,
        tokens
    );
    let folder = adapter_dir(&cfg.domain.dir, &a.collection);
    std::fs::create_dir_all(&folder)
        .with_context(|| format!("cannot create {}", folder.display()))?;
    let work = folder.join("work");
    if a.fresh {
        let _ = std::fs::remove_dir_all(&work);
    }
    let pb = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps  loss {msg}  {elapsed} (eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut avg = None::<f64>;
    let trained = train_domain(
        &model.decoder,
        &built.examples,
        &s,
        Some(&work),
        &mut |done, total, loss| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            let m = avg.map_or(loss, |m| 0.95 * m + 0.05 * loss);
            avg = Some(m);
            pb.set_message(format!("{m:.3}"));
            true
        },
    )?;
    pb.finish_and_clear();
    let _ = std::fs::remove_dir_all(&work);

    let mut settings = serde_json::to_value(&s)?;
    settings["top_k"] = top_k.into();
    settings["system"] = a.system.clone().into();
    settings["part"] = serde_json::to_value(a.part)?;
    settings["limit"] = a.limit.into();
    let card = DomainCard {
        format: CARD_FORMAT,
        collection: a.collection.clone(),
        model_id: cfg.model.id.clone(),
        model_sha256: crate::model::fingerprint::weights_sha256(&cfg.model.path)?,
        fingerprint: coll.fingerprint()?,
        shape: Shape {
            rank: s.rank,
            alpha: s.alpha,
            targets: s.targets.clone(),
        },
        settings,
        data: built.data,
        loss_curve: trained.curve.clone(),
        steps: trained.steps,
        train_seconds: t0.elapsed().as_secs_f64(),
        adapter_sha256: String::new(),
        adapter_bytes: 0,
    };
    let card = save_adapter(&folder, &trained.lora, card)?;
    let first = trained.curve.first().map_or(f64::NAN, |c| c.1);
    let last = trained.curve.last().map_or(f64::NAN, |c| c.1);
    println!(
        "{}: {} steps ({} this run) in {:.0} s, loss {first:.3} -> {last:.3}; adapter {:.1} MB in {}",
        a.collection,
        trained.steps,
        trained.ran,
        t0.elapsed().as_secs_f64(),
        card.adapter_bytes as f64 / 1e6,
        folder.display()
    );
    Ok(())
}
