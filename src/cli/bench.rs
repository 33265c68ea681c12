//! `ttarag bench`: prefill and decode throughput, time to first token and peak memory for a
//! RAG-sized prompt, on the configured model and device. Prints figures; asserts nothing.

use std::time::Instant;

use anyhow::Context;
use candle_core::Tensor;
use clap::Args;

use super::usage::{peak_rss_mb, reset_peak_rss};
use crate::config::Config;
use crate::model::{ChatMessage, ForwardOpts, Logits, StepGraph};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Prompt length in tokens (a RAG prompt built from the sample corpus).
    #[arg(long, default_value_t = 400)]
    pub prompt_tokens: usize,
    /// Tokens to decode after the prompt.
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Timed runs (the median is reported); one untimed warm-up run precedes them.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Instead, time test-time adaptation (config [tta] defaults) on this many QASC questions
    /// from the sample corpus's collection.
    #[arg(long)]
    pub tta: Option<usize>,
    /// With --tta: also write the pairs trained on, per question, as JSON (for reference runs).
    #[arg(long, requires = "tta")]
    pub dump_pairs: Option<std::path::PathBuf>,
    /// With --tta: also run this many LoRA adaptations at once and report the peak memory they
    /// add, per request.
    #[arg(long, requires = "tta")]
    pub concurrent: Option<usize>,
    /// With --tta: for each of these counts k, time one LoRA training step over the pairs of
    /// k requests in one pass (what batching adaptations across requests would run) against k
    /// steps of one request each.
    #[arg(long, requires = "tta", value_delimiter = ',')]
    pub adapt_batch: Vec<usize>,
    /// Instead, time the retrieval gate (config [gate] probe) on this many questions, against
    /// reading every layer as the trainer does.
    #[arg(long, conflicts_with = "tta")]
    pub gate: Option<usize>,
    /// Instead, a concurrency sweep: for each of these client counts, clients submitting QASC
    /// dev questions one after another through the engine; req/s, p50/p99, decode tok/s, RSS.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["tta", "gate"])]
    pub load: Vec<usize>,
    /// Instead, batched decode: for each of these batch sizes, that many sequences (each the
    /// --prompt-tokens prompt, prefilled alone) decode --new-tokens steps together.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["tta", "gate", "load"])]
    pub batch: Vec<usize>,
    /// Instead, check the device's own kernels against the candle ops they replace (largest
    /// difference, time of each) over this many steps; exits 1 when one is out of tolerance.
    #[arg(long, conflicts_with_all = ["tta", "gate", "load", "batch"])]
    pub kernels: Option<usize>,
    /// Instead, this many whole adapted answers (after one untimed): a --prompt-tokens RAG
    /// prompt, three training pairs of about 96 tokens, adaptation ([tta] scope), then
    /// prefill and --new-tokens greedy tokens through the adapted model.
    #[arg(long, conflicts_with_all = ["tta", "gate", "load", "batch", "kernels"])]
    pub query: Option<usize>,
    /// With --query: also write the prompt's ids, the pairs' ids and the training settings as
    /// JSON, for a reference implementation to run the same query
    /// (scripts/reference/query_reference.py).
    #[arg(long, requires = "query")]
    pub dump_query: Option<std::path::PathBuf>,
    /// With --batch: each sequence also carries its own LoRA ([tta] rank and targets); each
    /// batch size is timed with no adapters, with each row's delta computed alone, and with
    /// the rows' factors gathered into batched products.
    #[arg(long, requires = "batch")]
    pub lora: bool,
    /// With --load: the request modes swept.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "static,tta",
        requires = "load"
    )]
    pub modes: Vec<String>,
    /// With --load: also draw req/s and p99 latency against clients, per mode, into
    /// PREFIX-throughput.png and PREFIX-p99.png.
    #[arg(long, value_name = "PREFIX", requires = "load")]
    pub chart: Option<std::path::PathBuf>,
}

fn median(v: &mut [f64]) -> f64 {
    crate::numeric::median(v)
}

pub(super) fn rag_prompt(
    cfg: &Config,
    model: &crate::model::Model,
    target: usize,
) -> anyhow::Result<Vec<u32>> {
    let facts: Vec<String> = match &cfg.retrieval.sample_corpus {
        Some(p) if p.exists() => std::fs::read_to_string(p)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("text")?.as_str().map(String::from))
            .take(200)
            .collect(),
        _ => vec!["Plants need sunlight to make food by photosynthesis.".to_string(); 200],
    };
    let mut context = String::new();
    for f in facts.iter().cycle().take(2000) {
        context.push_str("- ");
        context.push_str(f);
        context.push('\n');
        let ids = model
            .encode_chat(&[ChatMessage::new(
                "user",
                &format!("Context:\n{context}\nQuestion: What do plants need to grow?"),
            )])?
            .ids;
        if ids.len() >= target {
            return Ok(ids);
        }
    }
    anyhow::bail!("could not build a {target}-token prompt")
}

pub fn run(cfg: Config, a: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.runs >= 1 && a.new_tokens >= 1,
        "--runs and --new-tokens must be positive"
    );
    let model = super::load_model(&cfg)?;
    if let Some(steps) = a.kernels {
        return super::bench_kernels::run(&model.decoder, steps.max(1));
    }
    if let Some(n) = a.gate {
        return bench_gate(&cfg, &model, n);
    }
    if !a.load.is_empty() {
        return super::bench_load::run(&cfg, model, &a.load, &a.modes, a.chart.as_deref());
    }
    if let Some(n) = a.tta {
        bench_tta(&cfg, &model, n, a.dump_pairs.as_deref())?;
        if let Some(k) = a.concurrent {
            bench_concurrent_lora(&cfg, &model, k)?;
        }
        if !a.adapt_batch.is_empty() {
            bench_adapt_batch(&cfg, &model, &a.adapt_batch, a.runs)?;
        }
        return Ok(());
    }
    let ids = rag_prompt(&cfg, &model, a.prompt_tokens)?;
    if let Some(n) = a.query {
        return super::bench_query::run(
            &cfg,
            &model,
            &ids,
            a.new_tokens,
            n.max(1),
            a.dump_query.as_deref(),
        );
    }
    if !a.batch.is_empty() {
        return bench_batch(&cfg, &model, &ids, &a);
    }
    let dec = &model.decoder;
    let opts = ForwardOpts {
        logits: Logits::Last,
        ..Default::default()
    };
    let (mut prefill, mut decode, mut ttft) = (vec![], vec![], vec![]);
    for run in 0..=a.runs {
        let mut cache = dec.new_cache(ids.len() + a.new_tokens);
        let t0 = Instant::now();
        let input = Tensor::new(ids.as_slice(), dec.device())?.unsqueeze(0)?;
        let logits = dec
            .forward(&input, Some(&mut cache), &opts)?
            .logits
            .expect("logits");
        let mut next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        let t_first = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        for _ in 1..a.new_tokens {
            let input = Tensor::new(&[next], dec.device())?.unsqueeze(0)?;
            let logits = dec
                .forward(&input, Some(&mut cache), &opts)?
                .logits
                .expect("logits");
            next = logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?;
        }
        let t_dec = t1.elapsed().as_secs_f64();
        if run > 0 {
            prefill.push(ids.len() as f64 / t_first);
            decode.push((a.new_tokens - 1) as f64 / t_dec);
            ttft.push(t_first * 1e3);
        }
    }
    println!("model          {}", cfg.model.path.display());
    println!("device         {} {}", cfg.model.device, cfg.model.dtype);
    println!("threads        {}", candle_core::utils::get_num_threads());
    println!(
        "prompt         {} tokens, {} new tokens, median of {} runs",
        ids.len(),
        a.new_tokens,
        a.runs
    );
    println!("prefill        {:.1} tok/s", median(&mut prefill));
    println!("decode         {:.1} tok/s", median(&mut decode));
    println!("ttft           {:.1} ms", median(&mut ttft));
    if let Some(mb) = peak_rss_mb() {
        println!("peak rss       {mb:.0} MB");
    }
    Ok(())
}

/// Aggregate decode tok/s of `a.batch` sequences stepping together, against one alone.
fn bench_batch(
    cfg: &Config,
    model: &crate::model::Model,
    ids: &[u32],
    a: &BenchArgs,
) -> anyhow::Result<()> {
    let dec = &model.decoder;
    let opts = ForwardOpts {
        logits: Logits::Last,
        ..Default::default()
    };
    println!(
        "prompt {} tokens per sequence, {} decode steps, median of {} runs",
        ids.len(),
        a.new_tokens,
        a.runs
    );
    println!("| sequences | adapters | step ms | decode tok/s (all sequences) |");
    println!("|---|---|---|---|");
    let variants: &[&str] = if a.lora {
        &["none", "each alone", "gathered"]
    } else {
        &["none"]
    };
    let lora_cfg = crate::adapt::LoraConfig {
        rank: cfg.tta.lora_rank,
        targets: cfg
            .tta
            .lora_targets
            .iter()
            .filter_map(|t| crate::adapt::parse_target(t))
            .collect(),
        ..Default::default()
    };
    for &b in &a.batch {
        anyhow::ensure!(
            (1..=256).contains(&b),
            "--batch sizes must be within 1..=256"
        );
        let loras = if a.lora {
            (0..b)
                .map(|i| {
                    crate::adapt::Lora::new(
                        dec.config(),
                        &lora_cfg,
                        i as u64,
                        dec.device(),
                        dec.dtype(),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            vec![]
        };
        // Each variant launched op by op, then through a step graph where the device serves
        // one (replayed from a captured CUDA graph on a GPU; the same ops on the CPU).
        let graphs: &[bool] = if dec.device_steps_serve(ids.len() + a.new_tokens) {
            &[false, true]
        } else {
            &[false]
        };
        // A step graph gathers its rows' adapters itself: "each alone" runs op by op only.
        for (&variant, &graph) in variants
            .iter()
            .flat_map(|v| graphs.iter().map(move |g| (v, g)))
            .filter(|(v, g)| !(**g && **v == "each alone"))
        {
            let rows: Vec<Option<&dyn crate::model::Adapter>> = loras
                .iter()
                .map(|l| Some(l as &dyn crate::model::Adapter))
                .collect();
            let graph_rows = match variant {
                "none" => vec![None; b],
                _ => rows.clone(),
            };
            let cache = crate::model::Gathered::default();
            let per_row = match variant {
                "each alone" => crate::model::PerRow::each_alone(rows),
                _ => crate::model::PerRow::with_cache(rows, &cache),
            };
            let step_opts = ForwardOpts {
                adapter: (variant != "none").then_some(&per_row as &dyn crate::model::Adapter),
                ..opts
            };
            let mut per_step = vec![];
            let mut replayed = false;
            for run in 0..=a.runs {
                let mut caches: Vec<_> = (0..b)
                    .map(|_| {
                        let mut c = dec.new_cache(ids.len() + a.new_tokens);
                        let input = Tensor::new(ids, dec.device())?.unsqueeze(0)?;
                        dec.forward(&input, Some(&mut c), &opts)?;
                        Ok(c)
                    })
                    .collect::<anyhow::Result<_>>()?;
                let mut refs: Vec<_> = caches.iter_mut().collect();
                let mut tokens = vec![ids[ids.len() - 1]; b];
                let t = Instant::now();
                let mut steps = match graph {
                    true => Some(StepGraph::new(dec, &mut refs, a.new_tokens)?),
                    false => None,
                };
                for _ in 0..a.new_tokens {
                    let logits = match &mut steps {
                        Some(g) => g.step(dec, &tokens, &mut refs, &graph_rows)?.0,
                        None => dec.decode_step(&tokens, &mut refs, &step_opts)?,
                    };
                    tokens = logits.argmax(candle_core::D::Minus1)?.to_vec1::<u32>()?;
                }
                if run > 0 {
                    per_step.push(t.elapsed().as_secs_f64() * 1e3 / a.new_tokens as f64);
                }
                replayed |= steps.is_some_and(|g| g.captured());
            }
            let ms = median(&mut per_step);
            let how = match (graph, replayed) {
                (false, _) => "",
                (true, true) => ", step graph (replayed)",
                (true, false) => ", step graph (ops one by one)",
            };
            println!(
                "| {b} | {variant}{how} | {ms:.1} | {:.1} |",
                b as f64 * 1e3 / ms
            );
        }
    }
    Ok(())
}

/// The gate's cost per question as served (blocks above the card's layer not run) and as the
/// trainer reads features (every layer), alternating question by question.
fn bench_gate(cfg: &Config, model: &crate::model::Model, n: usize) -> anyhow::Result<()> {
    use crate::gate::features::prompt_features;
    use crate::gate::policy::Policy;

    let weights = crate::model::fingerprint::WeightsDigest::of(&cfg.model.path);
    let gate = super::load_gate(cfg, model, &weights)?.context("no [gate] probe is configured")?;
    let questions = [
        "What can damage buildings?",
        "Hi there, how are you today?",
        "Does aspirin reduce the risk of a second heart attack in older adults?",
        "What do plants need to make food?",
        "What causes the seasons on Earth?",
        "Can you write me a short poem about the sea?",
    ];
    // A post-pass probe also reads the prompt with passages from the configured collection.
    let rag = if gate.needs_passages() {
        Some((
            super::open_collections(cfg)?.get(&cfg.retrieval.collection)?,
            crate::engine::RagPrompt::new(&cfg.retrieval.prompt_template)?,
        ))
    } else {
        None
    };
    let (mut served, mut every) = (vec![], vec![]);
    for (i, q) in questions.iter().cycle().take(n.max(1) + 1).enumerate() {
        let messages = [ChatMessage::new("user", q)];
        let with_passages = match &rag {
            Some((coll, prompt)) => {
                Some(prompt.apply(&messages, &coll.search(q, cfg.retrieval.top_k)?)?)
            }
            None => None,
        };
        let r = gate.assess(
            model,
            &messages,
            with_passages.as_deref(),
            Policy::Optimistic,
        )?;
        let t = Instant::now();
        prompt_features(model, &messages, None)?;
        // The first question warms up, untimed.
        if i > 0 {
            served.push(r.gate_ms);
            every.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let layers = model.decoder.config().num_hidden_layers;
    println!(
        "probe          {}",
        cfg.gate.probe.clone().unwrap_or_default().display()
    );
    println!("threads        {}", candle_core::utils::get_num_threads());
    println!("questions      {}", served.len());
    println!(
        "gate           {:.1} ms median ({} pass, layers 1..={} of {layers}, probe and policy \
         included)",
        median(&mut served),
        gate.card.features.pass.name(),
        gate.card.features.layer
    );
    println!(
        "all layers     {:.1} ms median (features only, as `gate train` reads them)",
        median(&mut every)
    );
    Ok(())
}

/// Questions the LoRA benches retrieve passages for.
const ADAPT_QUESTIONS: [&str; 8] = [
    "What can damage buildings?",
    "What do plants need to make food?",
    "What causes the seasons on Earth?",
    "How do animals get energy?",
    "What can cause erosion of soil?",
    "What do bees help plants do?",
    "How do fish breathe underwater?",
    "What protects the body from germs?",
];

/// The configured adaptation recipe as scope LoRA, without a time budget (benches time whole
/// adaptations).
fn lora_recipe(cfg: &Config) -> anyhow::Result<crate::engine::TtaParams> {
    let mut tta = cfg.tta.clone();
    tta.time_budget_ms = 0.0;
    tta.scope = "lora".into();
    crate::engine::resolve_tta(&tta, &crate::engine::TtaOverrides::default(), 0)
        .map_err(|e| anyhow::anyhow!("{}", e.message))
}

/// Peak memory that `k` simultaneous LoRA adaptations add above the resident model, against
/// one alone: what each concurrent request costs, activations and optimiser state included.
fn bench_concurrent_lora(
    cfg: &Config,
    model: &crate::model::Model,
    k: usize,
) -> anyhow::Result<()> {
    use crate::adapt::{adapt_lora, build_pairs, encode_pairs};

    let cols = super::open_collections(cfg)?;
    let coll = cols.get(&cfg.retrieval.collection)?;
    let params = lora_recipe(cfg)?;
    let questions = ADAPT_QUESTIONS;
    let mut sets = Vec::new();
    for q in questions.iter().cycle().take(k.max(1)) {
        let hits = coll.search(q, cfg.retrieval.top_k)?;
        let texts: Vec<&str> = hits.iter().map(|p| p.text.as_str()).collect();
        let set = build_pairs(&texts, &params.pairs);
        let ex = encode_pairs(model, &set.pairs, None, params.train.max_tokens_per_pair)?;
        sets.push((ex, set.source));
    }
    let adapt_all = |sets: &[(Vec<crate::adapt::Example>, crate::adapt::PairSource)]| {
        std::thread::scope(|s| {
            let handles: Vec<_> = sets
                .iter()
                .map(|(ex, src)| {
                    s.spawn(|| adapt_lora(&model.decoder, None, ex, *src, &params.train))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("adaptation thread"))
                .collect::<Result<Vec<_>, _>>()
        })
    };
    adapt_all(&sets[..1])?; // warm-up
    let added = |sets| -> anyhow::Result<Option<f64>> {
        let before = reset_peak_rss();
        let out = adapt_all(sets)?;
        drop(out);
        Ok(before.zip(peak_rss_mb()).map(|(b, p)| p - b))
    };
    let one = added(&sets[..1])?;
    let many = added(&sets)?;
    if let (Some(one), Some(many)) = (one, many) {
        println!("concurrent     1 LoRA adaptation adds {one:.0} MB peak RSS");
        println!(
            "concurrent     {k} at once add {many:.0} MB: {:.1} MB per request",
            many / k.max(1) as f64
        );
    } else {
        println!("concurrent     peak RSS is not readable on this system");
    }
    Ok(())
}

/// One training step (forward and backward; the optimiser is per request either way) over the
/// pairs of `k` requests in one pass, against `k` one-request steps: whether batching
/// adaptations across requests pays on this device. The pass shares one adapter, which costs
/// the same as per-row adapters up to their rank-r products.
fn bench_adapt_batch(
    cfg: &Config,
    model: &crate::model::Model,
    ks: &[usize],
    runs: usize,
) -> anyhow::Result<()> {
    use crate::adapt::{adapt_lora, build_pairs, encode_pairs, Example, PairSource};

    let cols = super::open_collections(cfg)?;
    let coll = cols.get(&cfg.retrieval.collection)?;
    let base = lora_recipe(cfg)?;
    let per_request = base.train.grad_accum.max(1);
    let questions = ADAPT_QUESTIONS;
    // One step's pairs per request: the first `grad_accum` of its retrieved passages' pairs.
    let mut requests: Vec<Vec<Example>> = Vec::new();
    for q in questions.iter().cycle() {
        if requests.len() == ks.iter().copied().max().unwrap_or(1) {
            break;
        }
        let hits = coll.search(q, cfg.retrieval.top_k)?;
        let texts: Vec<&str> = hits.iter().map(|p| p.text.as_str()).collect();
        let set = build_pairs(&texts, &base.pairs);
        let ex = encode_pairs(model, &set.pairs, None, base.train.max_tokens_per_pair)?;
        if ex.len() >= per_request {
            requests.push(ex[..per_request].to_vec());
        }
    }
    // Forward + backward of one step over `ex` as one group.
    let step = |ex: &[Example]| -> anyhow::Result<f64> {
        let mut p = base.train.clone();
        p.grad_accum = ex.len();
        p.steps = Some(1);
        let (_, r) = adapt_lora(&model.decoder, None, ex, PairSource::Sentences, &p)?;
        Ok(r.forward_ms + r.backward_ms)
    };
    step(&requests[0])?; // warm-up
    println!("adapt batch    one training step (forward + backward), medians of {runs}");
    let timed = |ex: &[Example]| -> anyhow::Result<f64> {
        let mut v = (0..runs.max(1))
            .map(|_| step(ex))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(median(&mut v))
    };
    // Each request's own step, timed once and summed per k.
    let alone = requests
        .iter()
        .map(|r| timed(r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    for &k in ks {
        let k = k.clamp(1, requests.len());
        let together = timed(&requests[..k].concat())?;
        let one_by_one: f64 = alone[..k].iter().sum();
        println!(
            "adapt batch    {k:>2} requests ({:>2} pairs): {together:>7.1} ms in one pass, \
             {one_by_one:>7.1} ms one by one: {:.2}x",
            k * per_request,
            one_by_one / together
        );
    }
    Ok(())
}

/// Adaptation cost per question: retrieve top-k, build pairs, adapt (LoRA), with the
/// configured defaults. Questions are the first `n` whose retrieval yields any pair.
fn bench_tta(
    cfg: &Config,
    model: &crate::model::Model,
    n: usize,
    dump: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use crate::adapt::{adapt_full, adapt_lora, build_pairs, encode_pairs};
    use crate::engine::{resolve_tta, TtaOverrides, TtaScope};

    let cols = super::open_collections(cfg)?;
    let coll = cols.get(&cfg.retrieval.collection)?;
    let questions = [
        "What can damage buildings?",
        "Damming a river results in what?",
        "What do plants need to make food?",
        "What causes the seasons on Earth?",
        "How do animals get energy?",
        "What is formed when water freezes?",
        "What can cause erosion of soil?",
        "What do bees help plants do?",
        "What happens when metal is heated?",
        "How do fish breathe underwater?",
        "What protects the body from germs?",
        "What do roots absorb from soil?",
    ];
    let mut cfg_tta = cfg.tta.clone();
    cfg_tta.time_budget_ms = 0.0;
    let params = resolve_tta(&cfg_tta, &TtaOverrides::default(), 0)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let (mut total, mut fwd, mut bwd, mut opt, mut deltas) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut train_loop = vec![];
    let mut lora_bytes = 0;
    let mut working_mb = vec![];
    let mut dumped = vec![];
    // The first question is a warm-up (allocator and page faults of the first large buffers),
    // not timed, as in the decode benchmark.
    for (i, q) in questions.iter().cycle().take(n.max(1) + 1).enumerate() {
        let hits = coll.search(q, cfg.retrieval.top_k)?;
        let texts: Vec<&str> = hits.iter().map(|p| p.text.as_str()).collect();
        let set = build_pairs(&texts, &params.pairs);
        let rss_before = reset_peak_rss();
        if i > 0 {
            dumped.push(serde_json::json!({"question": q, "pairs": set.pairs}));
        }
        let ex = encode_pairs(model, &set.pairs, None, params.train.max_tokens_per_pair)?;
        let r = match params.scope {
            TtaScope::Lora => {
                let (lora, r) = adapt_lora(&model.decoder, None, &ex, set.source, &params.train)?;
                if let Some(l) = &lora {
                    lora_bytes = l.bytes();
                }
                r
            }
            TtaScope::Full => adapt_full(&model.decoder, &ex, set.source, &params.train)?.1,
        };
        if i == 0 {
            continue;
        }
        if let (Some(before), Some(peak)) = (rss_before, peak_rss_mb()) {
            working_mb.push(peak - before);
        }
        total.push(r.adapt_ms);
        fwd.push(r.forward_ms);
        bwd.push(r.backward_ms);
        opt.push(r.optimizer_ms);
        train_loop.push(r.forward_ms + r.backward_ms + r.optimizer_ms);
        if let (Some(b), Some(a)) = (r.loss_before, r.loss_after) {
            deltas.push(a - b);
        }
    }
    if let Some(p) = dump {
        std::fs::write(p, serde_json::to_string_pretty(&dumped)?)?;
    }
    println!("model          {}", cfg.model.path.display());
    println!("threads        {}", candle_core::utils::get_num_threads());
    let (lr, rank) = match params.scope {
        TtaScope::Lora => (cfg.tta.lr, format!(", rank {}", cfg.tta.lora_rank)),
        TtaScope::Full => (cfg.tta.full_lr, String::new()),
    };
    let bf16 = match (
        cfg.tta.bf16_products,
        crate::model::bf16_products_available(),
    ) {
        (false, _) => "off",
        (true, true) => "on",
        (true, false) => "on, but this CPU lacks AVX-512 BF16",
    };
    println!(
        "tta            scope {}, lr {lr}, max_pairs {}, grad_accum {}{rank}",
        cfg.tta.scope, cfg.tta.max_pairs, cfg.tta.grad_accum
    );
    println!(
        "               bf16 products {bf16}, recompute activations {}",
        cfg.tta.recompute_activations && cfg.tta.scope == "lora"
    );
    println!("questions      {}", total.len());
    println!("adapt          {:.0} ms median", median(&mut total));
    println!(
        "training loop  {:.0} ms median (forward + backward + optimizer: what \
         scripts/reference/tta_reference.py times)",
        median(&mut train_loop)
    );
    let (f, b, o) = (median(&mut fwd), median(&mut bwd), median(&mut opt));
    println!("  forward      {f:.0} ms (training passes)");
    println!("  backward     {b:.0} ms");
    println!("  optimizer    {o:.1} ms");
    println!("  loss before/after and setup: the rest");
    println!(
        "loss delta     {:.3} median (after - before)",
        median(&mut deltas)
    );
    println!(
        "lora weights   {:.2} MB per request",
        lora_bytes as f64 / 1e6
    );
    if !working_mb.is_empty() {
        println!(
            "working memory {:.0} MB median per adaptation (peak RSS above the RSS before it)",
            median(&mut working_mb)
        );
    }
    if let Some(mb) = peak_rss_mb() {
        println!("peak rss       {mb:.0} MB");
    }
    Ok(())
}
