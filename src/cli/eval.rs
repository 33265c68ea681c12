//! `ttarag eval`: compares RAG arms (closed book, static, test-time adaptation) on a QA set.

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;
use crate::eval::dataset::{Part, Subset};
use crate::eval::spec::EvalSpec;
use crate::eval::EvalJob;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Experiment file: dataset, run settings and arms (see configs/eval/).
    #[arg(long)]
    pub spec: PathBuf,
    /// Output folder for records.jsonl, report.md, report.json and report.png. An unfinished
    /// run there is resumed. Default: runs/eval-<dataset name>.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Split of the QA set: dev (one question in five, by id) for tuning, test (the rest) for
    /// reporting, or all. Applied before --sample and --limit.
    #[arg(long, value_enum, default_value_t = Part::All)]
    pub part: Part,
    /// Evaluate only the first N questions (after --sample).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Evaluate a random sample of N questions, drawn with --seed.
    #[arg(long)]
    pub sample: Option<usize>,
    /// Seed of --sample.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Run only these arms (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    pub arms: Vec<String>,
    /// Discard the records of an earlier run in the output folder.
    #[arg(long)]
    pub fresh: bool,
    /// Override the questions file of the experiment.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(cfg: Config, a: EvalArgs) -> anyhow::Result<()> {
    cfg.validate()?;
    let mut spec = EvalSpec::from_file(&a.spec)?;
    if let Some(q) = a.questions {
        spec.dataset.questions = q;
    }
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("runs/eval-{}", spec.dataset.name)));
    // Fail on a bad experiment file before spending time on the model.
    spec.resolve(&cfg)?;
    let model = super::load_model(&cfg)?;
    let outcome = crate::eval::run(
        &cfg,
        model,
        EvalJob {
            spec,
            subset: Subset {
                part: a.part,
                limit: a.limit,
                sample: a.sample,
                seed: a.seed,
            },
            only_arms: a.arms,
            out: out.clone(),
            fresh: a.fresh,
            progress: !a.quiet,
        },
    )?;
    let table_end = outcome
        .markdown
        .find("\n## Settings")
        .unwrap_or(outcome.markdown.len());
    println!("{}", &outcome.markdown[..table_end]);
    println!(
        "{} answers computed, {} reused from an earlier run; report in {}",
        outcome.ran,
        outcome.resumed,
        out.display()
    );
    Ok(())
}
