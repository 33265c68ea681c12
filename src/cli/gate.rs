//! `ttarag gate train`: labels from eval records (plus hand-labelled extras), hidden-state
//! features from the configured model, the layer-wise sweep, and the chosen probe saved with
//! its card.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::config::Config;
use crate::engine::RagPrompt;
use crate::eval::gate::labels::{examples_from_jsonl, examples_from_run, Example};
use crate::eval::gate::report::{write_all, Header, Source};
use crate::eval::gate::sweep::{sweep, FeatureSets, SweepOptions};
use crate::gate::card::{CardModel, CardScores, Decides, FeatureTap, GateCard, Pass, CARD_FORMAT};
use crate::gate::features::{prompt_features, Position};
use crate::gate::policy::CLASSES;
use crate::gate::probe::{ProbeKind, TrainOptions};

#[derive(Debug, Subcommand)]
pub enum GateCmd {
    /// Train a gate: a probe per layer, the best one saved with its card. With `--without` an
    /// arm without retrieval it is a retrieval gate; with `--without static --with tta` (both
    /// retrieve, one adapts) an adaptation gate, for `[gate] adapt_probe`.
    Train(TrainArgs),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Eval records (`records.jsonl` or `report.json` of `ttarag eval`) that answered the same
    /// questions without and with retrieval. Repeatable.
    #[arg(long, required = true, num_args = 1..)]
    pub records: Vec<PathBuf>,
    /// The arm without retrieval (or, for an adaptation gate, with retrieval but no
    /// adaptation).
    #[arg(long, default_value = "closed_book")]
    pub without: String,
    /// The arm with retrieval (for an adaptation gate: the one that adapts).
    #[arg(long, default_value = "static")]
    pub with: String,
    /// Hand-labelled questions: JSONL rows {"id", "question", "class": "S1".."S4", "system"?}.
    #[arg(long, num_args = 1..)]
    pub extra: Vec<PathBuf>,
    /// Where the card goes; the weights go beside it (`<stem>.safetensors`).
    /// Default: models/gate/<model id>.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Folder for report.md, report.json and the by-layer charts. Default: runs/gate-<model id>.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Layers to probe (comma-separated; default all, 0 = embeddings).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Feature passes: pre (the question alone), post (also the question with its retrieved
    /// passages, concatenated; retrieval from each run's collection, extras from the
    /// configured one).
    #[arg(long, value_delimiter = ',', default_value = "pre")]
    pub passes: Vec<String>,
    /// Feature positions: last (last prompt token), mean (mean over the question's tokens).
    #[arg(long, value_delimiter = ',', default_value = "last,mean")]
    pub positions: Vec<String>,
    /// Probe kinds: logistic, mlp.
    #[arg(long, value_delimiter = ',', default_value = "logistic,mlp")]
    pub kinds: Vec<String>,
    /// Hidden width of the MLP probe.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Fraction of questions held out for the final scores.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Fraction of questions for early stopping and the choice.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Seed of the splits, initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(cfg: Config, cmd: GateCmd) -> anyhow::Result<()> {
    match cmd {
        GateCmd::Train(a) => train(cfg, a),
    }
}

fn parse_options(a: &TrainArgs) -> anyhow::Result<SweepOptions> {
    let positions = a
        .positions
        .iter()
        .map(|p| match p.as_str() {
            "last" => Ok(Position::Last),
            "mean" => Ok(Position::Mean),
            o => anyhow::bail!("--positions: `{o}` is not one of last, mean"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let passes = a
        .passes
        .iter()
        .map(|p| match p.as_str() {
            "pre" => Ok(Pass::Pre),
            "post" => Ok(Pass::Post),
            o => anyhow::bail!("--passes: `{o}` is not one of pre, post"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let kinds = a
        .kinds
        .iter()
        .map(|k| match k.as_str() {
            "logistic" => Ok(ProbeKind::Logistic),
            "mlp" => Ok(ProbeKind::Mlp { hidden: a.hidden }),
            o => anyhow::bail!("--kinds: `{o}` is not one of logistic, mlp"),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let fractions_ok =
        a.test_fraction > 0.0 && a.val_fraction > 0.0 && a.test_fraction + a.val_fraction < 1.0;
    anyhow::ensure!(
        fractions_ok,
        "--test-fraction and --val-fraction must be positive and sum to less than 1"
    );
    anyhow::ensure!(a.hidden >= 1, "--hidden must be at least 1");
    Ok(SweepOptions {
        layers: a.layers.clone(),
        passes,
        positions,
        kinds,
        test_fraction: a.test_fraction,
        val_fraction: a.val_fraction,
        train: TrainOptions {
            seed: a.seed,
            ..Default::default()
        },
    })
}

fn train(cfg: Config, a: TrainArgs) -> anyhow::Result<()> {
    cfg.validate()?;
    let opts = parse_options(&a)?;
    // Labels first: a bad file fails before the model loads.
    let mut examples: Vec<Example> = Vec::new();
    let mut sources = Vec::new();
    let mut decides = None;
    for r in &a.records {
        let run = examples_from_run(r, &a.without, &a.with)?;
        anyhow::ensure!(
            decides.is_none_or(|d| d == run.decides),
            "{}: its `{}` arm {} retrieve, unlike the other records files'; train one gate from \
             runs of one kind",
            r.display(),
            a.without,
            if run.decides == Decides::Retrieval {
                "does not"
            } else {
                "does"
            }
        );
        decides = Some(run.decides);
        sources.push(Source {
            path: r.display().to_string(),
            questions: run.examples.len(),
            skipped: run.skipped,
        });
        examples.extend(run.examples);
    }
    let decides = decides.unwrap_or_default();
    anyhow::ensure!(
        a.extra.is_empty() || decides == Decides::Retrieval,
        "--extra rows are classed by retrieval, so they cannot train an adaptation gate"
    );
    for e in &a.extra {
        let ex = examples_from_jsonl(e)?;
        sources.push(Source {
            path: e.display().to_string(),
            questions: ex.len(),
            skipped: 0,
        });
        examples.extend(ex);
    }

    let model = super::load_model(&cfg)?;
    let sha = crate::model::fingerprint::weights_sha256(&cfg.model.path)?;
    let pb = if a.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(examples.len() as u64).with_style(
            ProgressStyle::with_template("features {bar:40} {pos}/{len} ({eta})")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    };
    let post_pass = opts.passes.contains(&Pass::Post);
    let cols = if post_pass {
        Some(super::open_collections(&cfg)?)
    } else {
        None
    };
    let rag = RagPrompt::new(&cfg.retrieval.prompt_template)?;
    let mut feats = Vec::with_capacity(examples.len());
    let mut post_feats = Vec::new();
    for e in &examples {
        let at = || format!("{}: question `{}`", e.source, e.id);
        feats.push(prompt_features(&model, &e.messages, None).with_context(at)?);
        if let Some(cols) = &cols {
            let (name, k) = e
                .retrieval
                .clone()
                .unwrap_or_else(|| (cfg.retrieval.collection.clone(), cfg.retrieval.top_k));
            let question = crate::model::question(&e.messages).unwrap_or("");
            let hits = cols.get(&name)?.search(question, k).with_context(at)?;
            let with_passages = rag.apply(&e.messages, &hits)?;
            post_feats.push(prompt_features(&model, &with_passages, None).with_context(at)?);
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let labels: Vec<usize> = examples.iter().map(|e| e.class).collect();
    let device = model.decoder.device().clone();
    eprintln!(
        "training {} probes on {} questions",
        (if opts.layers.is_empty() {
            model.decoder.config().num_hidden_layers + 1
        } else {
            opts.layers.len()
        }) * opts.passes.len()
            * opts.positions.len()
            * opts.kinds.len(),
        labels.len()
    );
    let sets = FeatureSets {
        pre: &feats,
        post: post_pass.then_some(post_feats.as_slice()),
    };
    let (s, probe) = sweep(sets, &labels, &opts, &device)?;

    let header = Header {
        model_id: model.id.clone(),
        model_sha256: sha.clone(),
        without_arm: a.without.clone(),
        with_arm: a.with.clone(),
        decides,
        sources,
        seed: a.seed,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let report_dir = a
        .report
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/gate-{}", model.id)));
    write_all(&report_dir, &s, &header)?;

    let best = &s.cells[s.best];
    let card_path = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("models/gate/{}.json", model.id)));
    let stem = card_path
        .file_stem()
        .context("--out needs a file name")?
        .to_string_lossy()
        .to_string();
    let cfgm = model.decoder.config();
    let majority = CLASSES[s.majority_class].to_string();
    let card = GateCard {
        format: CARD_FORMAT,
        decides,
        model: CardModel {
            id: model.id.clone(),
            sha256: sha,
            hidden_size: cfgm.hidden_size,
            num_layers: cfgm.num_hidden_layers,
        },
        features: FeatureTap {
            pass: best.pass,
            layer: best.layer,
            position: best.position,
        },
        probe: best.probe,
        weights: format!("{stem}.safetensors"),
        classes: CLASSES.iter().map(|c| c.to_string()).collect(),
        label_counts: CLASSES
            .iter()
            .zip(s.label_counts)
            .map(|(c, n)| (c.to_string(), n))
            .collect::<BTreeMap<_, _>>(),
        validation: CardScores {
            n: s.n_val,
            accuracy: best.val.accuracy,
            macro_f1: best.val.macro_f1,
            majority_class: majority.clone(),
            majority_accuracy: s.majority_val_accuracy,
        },
        held_out: Some(CardScores {
            n: s.n_test,
            accuracy: best.test.accuracy,
            macro_f1: best.test.macro_f1,
            majority_class: majority,
            majority_accuracy: s.majority_test_accuracy,
        }),
        training: serde_json::json!({
            "records": a.records,
            "extra": a.extra,
            "without_arm": a.without,
            "with_arm": a.with,
            "splits": {"train": s.n_train, "validation": s.n_val, "held_out": s.n_test},
            "options": opts.train,
            "report": report_dir,
            "command": header.command,
        }),
    };
    card.save(&card_path, &probe)?;
    println!(
        "{} gate: chose layer {} ({}, {:?}, {:?}): validation macro-F1 {:.3}, held-out accuracy {:.3} \
         (majority {:.3})\ncard {}; report {}",
        decides.name(),
        best.layer,
        best.pass.name(),
        best.position,
        best.probe,
        best.val.macro_f1,
        best.test.accuracy,
        s.majority_test_accuracy,
        card_path.display(),
        report_dir.join("report.md").display()
    );
    Ok(())
}
