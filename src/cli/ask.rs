//! `ttarag ask "question"`: one answer in the terminal, through the same engine as the server.

use clap::Args;

use crate::config::Config;
use crate::engine::{
    resolve_tta, ChatJob, DomainUse, Engine, EngineConfig, Event, RagMode, RagParams, TtaOverrides,
};
use crate::generate::GenParams;
use crate::model::fingerprint::WeightsDigest;
use crate::model::ChatMessage;

#[derive(Debug, Args)]
pub struct AskArgs {
    /// The question.
    pub question: String,
    /// Collection to search. Overrides retrieval.collection.
    #[arg(long)]
    pub collection: Option<String>,
    /// Passages to retrieve.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Retrieval mode: static, tta (adapt to the passages first), none, or auto (the gate of
    /// `[gate]` decides, then `gate.then` runs). Default: gate.default_mode.
    #[arg(long)]
    pub mode: Option<String>,
    /// Gate policy for mode auto: always, optimistic, pessimistic or threshold:<t>.
    #[arg(long)]
    pub policy: Option<crate::gate::policy::Policy>,
    /// Most tokens to generate.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Answer on top of the collection's domain adapter (`true`: fail without a valid one),
    /// or not; default: `[domain] default_on`.
    #[arg(long)]
    pub domain_adapter: Option<bool>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(cfg: Config, a: AskArgs) -> anyhow::Result<()> {
    let asked = a.mode.as_deref().unwrap_or(&cfg.gate.default_mode);
    let auto = asked == "auto";
    let mode = RagMode::parse(if auto { &cfg.gate.then } else { asked })
        .ok_or_else(|| anyhow::anyhow!("--mode `{asked}` is not one of static, tta, none, auto"))?;
    anyhow::ensure!(
        !auto || cfg.gate.probe.is_some(),
        "--mode auto needs a gate probe: set gate.probe in the config"
    );
    let collection = a
        .collection
        .unwrap_or_else(|| cfg.retrieval.collection.clone());
    let gate_policy = auto.then(|| a.policy.unwrap_or_else(|| cfg.gate.policy_for(&collection)));
    let top_k = a.top_k.unwrap_or(cfg.retrieval.top_k);
    anyhow::ensure!(
        (1..=cfg.retrieval.max_top_k).contains(&top_k),
        "--top-k {top_k} is outside 1..={}",
        cfg.retrieval.max_top_k
    );
    let model = super::load_model(&cfg)?;
    let collections = super::open_collections(&cfg)?;
    let weights = WeightsDigest::of(&cfg.model.path);
    let gate = if auto {
        super::load_gate(&cfg, &model, &weights)?
    } else {
        None
    };
    if mode != RagMode::None && !collections.exists(&collection) {
        anyhow::bail!("unknown collection `{collection}`; see `ttarag index list`");
    }
    let engine = Engine::start(
        model.clone(),
        collections,
        &EngineConfig {
            workers: 1,
            queue_capacity: 1,
            prompt_template: cfg.retrieval.prompt_template.clone(),
            collection_templates: cfg.collection_templates(),
            gate,
            domain: Some(crate::adapt::domain::DomainAdapters::for_model(
                &cfg.domain.dir,
                &model,
                &weights,
            )),
            batch: crate::engine::BatchLimits::of(&cfg.server),
            ..Default::default()
        },
    )?;
    let job = ChatJob {
        messages: vec![ChatMessage::new("user", &a.question)],
        gen: GenParams {
            max_tokens: a.max_tokens.unwrap_or(cfg.generation.max_tokens),
            temperature: a.temperature.unwrap_or(cfg.generation.temperature),
            top_p: cfg.generation.top_p,
            seed: a.seed,
            stop: vec![],
        },
        rag: RagParams {
            mode,
            domain: match a.domain_adapter {
                Some(true) => DomainUse::Require,
                Some(false) => DomainUse::Off,
                None if cfg.domain.default_for(&collection) => DomainUse::Prefer,
                None => DomainUse::Off,
            },
            cite: false,
            collection,
            top_k,
            gate: gate_policy,
            adapt_gate: None,
        },
        tta: match mode {
            RagMode::Tta => Some(
                resolve_tta(&cfg.tta, &TtaOverrides::default(), a.seed)
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?,
            ),
            _ => None,
        },
    };
    let mut rx = engine.submit(job)?;
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Text(t) => {
                use std::io::Write;
                print!("{t}");
                let _ = std::io::stdout().flush();
            }
            Event::Done(c) => {
                println!();
                if !c.rag.passages.is_empty() {
                    println!("\npassages used:");
                    for p in &c.rag.passages {
                        println!("  [{}] ({:.2}) {}", p.id, p.score, p.text);
                    }
                }
                if let Some(g) = &c.rag.gate {
                    let probs: Vec<String> =
                        g.probs.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
                    println!(
                        "gate ({}, layer {}): {} [{}], {:.0} ms",
                        g.policy,
                        g.layer,
                        g.decision.as_str(),
                        probs.join(", "),
                        g.gate_ms
                    );
                }
                if let Some(tta) = &c.rag.tta {
                    println!(
                        "adaptation: {} pairs, {} steps, suffix loss {:?} -> {:?}, {:.0} ms{}",
                        tta.pairs,
                        tta.steps,
                        tta.loss_before,
                        tta.loss_after,
                        tta.adapt_ms,
                        tta.fallback
                            .as_ref()
                            .map(|f| format!(" ({f})"))
                            .unwrap_or_default()
                    );
                }
                let t = &c.rag.timings_ms;
                println!(
                    "\n{} prompt + {} completion tokens; retrieve {:.0} ms, prefill {:.0} ms, decode {:.0} ms",
                    c.prompt_tokens, c.completion_tokens, t.retrieve, t.prefill, t.decode
                );
                return Ok(());
            }
            Event::Error(e) => anyhow::bail!("{e}"),
        }
    }
    anyhow::bail!("the engine stopped before answering")
}
