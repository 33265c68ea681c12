//! Offline evaluation: arms, scoring, statistics, report. `ttarag eval` runs each arm of an
//! experiment file over a QA set through the server's own engine and writes a report.

pub mod dataset;
pub mod gate;
pub mod plot;
pub mod record;
pub mod report;
pub mod runner;
pub mod score;
pub mod spec;
pub mod stats;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};

use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
use crate::gate::card::Decides;
use crate::model::fingerprint::WeightsDigest;
use crate::model::Model;
use crate::retrieval::{ingest_path, Collections};
use dataset::Subset;
use record::RecordLog;
use report::{RunHeader, Summary};
use spec::EvalSpec;

/// One evaluation run.
pub struct EvalJob {
    pub spec: EvalSpec,
    pub subset: Subset,
    /// Only these arms of the spec (all when empty).
    pub only_arms: Vec<String>,
    pub out: PathBuf,
    /// Discard records of an earlier run in `out` instead of resuming it.
    pub fresh: bool,
    pub progress: bool,
}

/// What a finished run produced.
pub struct EvalOutcome {
    pub header: RunHeader,
    pub summary: Summary,
    pub markdown: String,
    pub ran: usize,
    pub resumed: usize,
}

fn ensure_collection(cols: &Collections, spec: &EvalSpec, max_chars: usize) -> anyhow::Result<()> {
    let ds = &spec.dataset;
    let missing = !cols.exists(&ds.collection) || cols.get(&ds.collection)?.is_empty();
    if missing {
        let Some(corpus) = &ds.corpus else {
            bail!(
                "collection `{}` does not exist and the eval config names no dataset.corpus to build it from",
                ds.collection
            );
        };
        let c = cols.get_or_create(&ds.collection)?;
        let stats = ingest_path(&c, corpus, max_chars, None)
            .with_context(|| format!("indexing {}", corpus.display()))?;
        tracing::info!(collection = %ds.collection, passages = stats.passages, "collection built");
    }
    Ok(())
}

/// The probe of the gated arms (one engine holds one gate of each kind, so they must share
/// it), checked against the model's weights and against the kind `decides`.
fn load_gate(
    model: &Model,
    weights: &WeightsDigest,
    arms: &[spec::ResolvedArm],
    decides: Decides,
) -> anyhow::Result<Option<Arc<crate::gate::card::LoadedGate>>> {
    let mut probes = arms.iter().filter_map(|a| {
        let g = a.gate.as_ref()?;
        match decides {
            Decides::Retrieval => Some(&g.probe),
            Decides::Adaptation => g.adapt.as_ref().map(|a| &a.probe),
        }
    });
    let Some(first) = probes.next() else {
        return Ok(None);
    };
    if let Some(other) = probes.find(|p| *p != first) {
        bail!(
            "gated arms name two probes ({} and {}); run them separately",
            first.display(),
            other.display()
        );
    }
    let gate = crate::gate::card::LoadedGate::open(first, decides, model, weights)?;
    Ok(Some(Arc::new(gate)))
}

/// Runs (or resumes) `job` on `model` and writes report.md, report.json, report.png and
/// records.jsonl into `job.out`.
pub fn run(cfg: &Config, model: Arc<Model>, job: EvalJob) -> anyhow::Result<EvalOutcome> {
    let mut spec = job.spec;
    if !job.only_arms.is_empty() {
        for a in &job.only_arms {
            if !spec.arms.iter().any(|x| &x.name == a) {
                bail!("--arms: no arm named `{a}` in the eval config");
            }
        }
        spec.arms.retain(|a| job.only_arms.contains(&a.name));
        if let Some(b) = &spec.run.baseline {
            if !job.only_arms.contains(b) {
                spec.run.baseline = None;
            }
        }
    }
    let arms = spec.resolve(cfg)?;
    let questions = dataset::select(
        dataset::load_questions(&spec.dataset.questions)?,
        &job.subset,
    );
    let cols = Arc::new(Collections::new(&cfg.retrieval.index_dir));
    if arms
        .iter()
        .any(|a| a.rag_mode() != crate::engine::RagMode::None)
    {
        ensure_collection(&cols, &spec, cfg.retrieval.passage_max_chars)?;
    }
    let weights = WeightsDigest::of(&cfg.model.path);
    // Arms on the domain adapter need a valid one: a run never scores them without it.
    let domain = match arms.iter().find(|a| a.domain_adapter) {
        None => None,
        Some(arm) => {
            let store =
                crate::adapt::domain::DomainAdapters::for_model(&cfg.domain.dir, &model, &weights);
            let name = &spec.dataset.collection;
            let fp = cols.get(name)?.fingerprint()?;
            let adapter = store
                .get(name, &fp)
                .map_err(|why| anyhow::anyhow!("arm `{}`: the domain adapter of `{name}` is refused: {why}", arm.name))?
                .with_context(|| {
                    format!(
                        "arm `{}` needs the domain adapter of collection `{name}`; train it with `ttarag index adapt --collection {name}`",
                        arm.name
                    )
                })?;
            Some((store, adapter.card.adapter_sha256.clone()))
        }
    };
    let header = RunHeader {
        version: env!("CARGO_PKG_VERSION").into(),
        model: model.id.clone(),
        model_path: cfg.model.path.display().to_string(),
        dataset: spec.dataset.clone(),
        run: spec.run.clone(),
        subset: job.subset,
        arms: arms.clone(),
        baseline: spec.baseline(),
        questions: questions.len(),
        prompt_template: cfg.retrieval.prompt_template.clone(),
        decode_quant: cfg.model.decode_quant.clone(),
        domain_adapter_sha256: domain.as_ref().map(|d| d.1.clone()),
    };

    std::fs::create_dir_all(&job.out)
        .with_context(|| format!("cannot create {}", job.out.display()))?;
    let run_file = job.out.join("run.json");
    let records_file = job.out.join("records.jsonl");
    if job.fresh {
        let _ = std::fs::remove_file(&records_file);
    } else if run_file.exists() {
        let old: RunHeader = serde_json::from_slice(&std::fs::read(&run_file)?)
            .with_context(|| format!("{} is not a run header", run_file.display()))?;
        check_compatible(&old, &header)?;
    }
    // Arms of earlier runs stay listed so their records remain checked on later resumes.
    let mut stored = header.clone();
    if let Ok(old) = std::fs::read(&run_file).map(|b| serde_json::from_slice::<RunHeader>(&b)) {
        if let (Ok(old), false) = (old, job.fresh) {
            for a in old.arms {
                if !stored.arms.iter().any(|x| x.name == a.name) {
                    stored.arms.push(a);
                }
            }
        }
    }
    std::fs::write(&run_file, serde_json::to_vec_pretty(&stored)?)?;
    let (mut log, done) = RecordLog::open(&records_file)?;

    let gate = load_gate(&model, &weights, &arms, Decides::Retrieval)?;
    let adapt_gate = load_gate(&model, &weights, &arms, Decides::Adaptation)?;
    let engine = Engine::start(
        model.clone(),
        cols,
        &EngineConfig {
            workers: 1,
            queue_capacity: 2,
            prompt_template: cfg.retrieval.prompt_template.clone(),
            collection_templates: cfg.collection_templates(),
            gate,
            adapt_gate,
            domain: domain.map(|d| d.0),
            batch: crate::engine::BatchLimits::of(&cfg.server),
            ..Default::default()
        },
    )?;
    let wanted: std::collections::HashSet<(String, String)> = questions
        .iter()
        .flat_map(|q| arms.iter().map(move |a| (a.name.clone(), q.id.clone())))
        .collect();
    let resumed = done.keys().filter(|k| wanted.contains(*k)).count();
    let records = runner::run_all(
        &engine,
        &spec,
        &arms,
        &questions,
        &mut log,
        done,
        job.progress,
    )?;
    let summary = report::summarise(&records, &arms, &header.baseline, &spec.run);
    report::write_all(&job.out, &header, &summary, &records)?;
    Ok(EvalOutcome {
        markdown: report::markdown(&header, &summary),
        ran: records.len() - resumed,
        resumed,
        header,
        summary,
    })
}

/// Records of an earlier run may be reused only if everything that shaped them is unchanged.
fn check_compatible(old: &RunHeader, new: &RunHeader) -> anyhow::Result<()> {
    let differs = |what: &str| {
        anyhow::anyhow!(
            "the output folder holds a run with a different {what}; pass --fresh to discard it or choose another --out"
        )
    };
    if old.model != new.model || old.model_path != new.model_path {
        return Err(differs("model"));
    }
    if old.dataset != new.dataset {
        return Err(differs("dataset"));
    }
    if old.prompt_template != new.prompt_template || old.decode_quant != new.decode_quant {
        return Err(differs("retrieval.prompt_template or model.decode_quant"));
    }
    if new.domain_adapter_sha256.is_some()
        && old.domain_adapter_sha256.is_some()
        && old.domain_adapter_sha256 != new.domain_adapter_sha256
    {
        return Err(differs("domain adapter (it was retrained)"));
    }
    let mut a = old.run.clone();
    let mut b = new.run.clone();
    // Neither changes a record.
    a.baseline = None;
    b.baseline = None;
    a.bootstrap_resamples = 0;
    b.bootstrap_resamples = 0;
    if a != b {
        return Err(differs("[run] section"));
    }
    for arm in &new.arms {
        if let Some(o) = old.arms.iter().find(|o| o.name == arm.name) {
            if o != arm {
                return Err(differs(&format!("setting of arm `{}`", arm.name)));
            }
        }
    }
    Ok(())
}
