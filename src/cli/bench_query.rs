//! `ttarag bench --query N`: whole test-time-adapted answers at a fixed shape: a
//! `--prompt-tokens` RAG prompt, three training pairs of about 96 tokens, adaptation with the
//! `[tta]` scope, then the prompt's prefill and `--new-tokens` greedy tokens through the
//! adapted model. Each phase ends with a device synchronisation, so GPU figures are whole.

use std::time::Instant;

use candle_core::Tensor;

use crate::adapt::{adapt_full, adapt_lora, encode_pairs, Pair, PairSource};
use crate::config::Config;
use crate::engine::{resolve_tta, TtaOverrides, TtaScope};
use crate::model::{Adapter, Decoder, ForwardOpts, Logits, Model, StepGraph};

/// Training pairs of about `tokens` tokens each, cut from the sample corpus's facts: each
/// joins facts until it is long enough, then splits at its middle word.
fn pairs(cfg: &Config, model: &Model, n: usize, tokens: usize) -> anyhow::Result<Vec<Pair>> {
    let facts: Vec<String> = match &cfg.retrieval.sample_corpus {
        Some(p) if p.exists() => std::fs::read_to_string(p)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("text")?.as_str().map(String::from))
            .take(400)
            .collect(),
        _ => vec!["Plants need sunlight to make food by photosynthesis.".to_string()],
    };
    let mut facts = facts.iter().cycle();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut text = String::new();
        while model.tokenizer.encode_text(&text)?.len() < tokens {
            text.push_str(facts.next().expect("a cycle never ends"));
            text.push(' ');
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let half = words.len() / 2;
        out.push(Pair {
            prefix: words[..half].join(" "),
            suffix: words[half..].join(" "),
        });
    }
    Ok(out)
}

/// One greedy answer's figures.
struct Answer {
    prefill_ms: f64,
    decode_ms: f64,
    tokens: Vec<u32>,
    /// Whether its steps replayed a captured graph.
    replayed: bool,
    /// That graph's nodes: what one replay launches.
    nodes: Option<usize>,
}

/// Greedy answer of `new_tokens` tokens to `ids` through `dec` (with `adapter`): each step a
/// forward pass of one position, or with `graph` a [`StepGraph`] step (replayed from a captured
/// graph on a GPU).
fn answer(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    ids: &[u32],
    new_tokens: usize,
    graph: bool,
) -> anyhow::Result<Answer> {
    let opts = ForwardOpts {
        logits: Logits::Last,
        adapter,
        ..Default::default()
    };
    let argmax =
        |l: &Tensor| -> candle_core::Result<u32> { l.flatten_all()?.argmax(0)?.to_scalar::<u32>() };
    let mut cache = dec.new_cache(ids.len() + new_tokens);
    let t = Instant::now();
    let input = Tensor::new(ids, dec.device())?.unsqueeze(0)?;
    let logits = dec.forward(&input, Some(&mut cache), &opts)?.logits;
    let mut tokens = vec![argmax(&logits.expect("logits"))?];
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let mut steps = match graph {
        true => Some(StepGraph::new(dec, &mut [&mut cache], new_tokens)?),
        false => None,
    };
    for _ in 1..new_tokens {
        let next = *tokens.last().expect("one token");
        let logits = match &mut steps {
            Some(g) => g.step(dec, &[next], &mut [&mut cache], &[adapter])?.0,
            None => {
                let input = Tensor::new(&[next], dec.device())?.unsqueeze(0)?;
                dec.forward(&input, Some(&mut cache), &opts)?
                    .logits
                    .expect("logits")
            }
        };
        tokens.push(argmax(&logits)?);
    }
    dec.device().synchronize()?;
    Ok(Answer {
        prefill_ms,
        decode_ms: t.elapsed().as_secs_f64() * 1e3,
        tokens,
        replayed: steps.as_ref().is_some_and(|g| g.captured()),
        nodes: steps.as_ref().and_then(|g| g.nodes()),
    })
}

pub fn run(
    cfg: &Config,
    model: &Model,
    ids: &[u32],
    new_tokens: usize,
    runs: usize,
    dump: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut tta = cfg.tta.clone();
    tta.time_budget_ms = 0.0;
    let params = resolve_tta(&tta, &TtaOverrides::default(), 0)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let pairs = pairs(cfg, model, 3, 96)?;
    let ex = encode_pairs(model, &pairs, None, params.train.max_tokens_per_pair)?;
    let pair_tokens: Vec<usize> = ex.iter().map(|e| e.ids.len()).collect();
    if let Some(path) = dump {
        // Everything a reference implementation needs to run the same query.
        let t = &params.train;
        let targets: Vec<&str> = t
            .lora
            .targets
            .iter()
            .map(|&x| crate::adapt::target_name(x))
            .collect();
        let query = serde_json::json!({
            "prompt_ids": ids,
            "pairs": ex.iter().map(|e| serde_json::json!({"ids": e.ids, "suffix_start": e.suffix_start})).collect::<Vec<_>>(),
            "new_tokens": new_tokens,
            "scope": format!("{:?}", params.scope).to_lowercase(),
            "lr": t.lr, "weight_decay": t.weight_decay, "eps": t.eps,
            "grad_accum": t.grad_accum, "clip_norm": t.clip_norm,
            "lora_rank": t.lora.rank, "lora_alpha": t.lora.alpha, "lora_targets": targets,
        });
        std::fs::write(path, serde_json::to_string(&query)?)?;
    }
    let dec = &model.decoder;
    // Decode through step graphs where the build, the config and the model allow them; the
    // other way is timed beside it, and the two must give the same tokens.
    let serve = |d: &Decoder| d.device_steps_serve(ids.len() + new_tokens);
    let graphs = dec.replays_steps() && serve(dec);
    let (mut total, mut adapt, mut prefill, mut per_token) = (vec![], vec![], vec![], vec![]);
    let (mut other_per_token, mut same, mut replayed) = (vec![], true, false);
    // Each run's adaptation report: forward, backward and optimiser milliseconds.
    let mut split: Vec<[f64; 3]> = vec![];
    let mut nodes = None;
    // One untimed query first: kernel loading and the allocator's first large buffers.
    for run in 0..=runs {
        dec.device().synchronize()?;
        let t = Instant::now();
        let (adapt_ms, main, other) = match params.scope {
            TtaScope::Lora => {
                let (lora, report) =
                    adapt_lora(dec, None, &ex, PairSource::PassageFallback, &params.train)?;
                dec.device().synchronize()?;
                let a = t.elapsed().as_secs_f64() * 1e3;
                split.push([report.forward_ms, report.backward_ms, report.optimizer_ms]);
                let lora = lora.ok_or_else(|| anyhow::anyhow!("adaptation fell back"))?;
                let main = answer(dec, Some(&lora), ids, new_tokens, graphs)?;
                let other = match serve(dec) {
                    true => Some(answer(dec, Some(&lora), ids, new_tokens, !graphs)?),
                    false => None,
                };
                (a, main, other)
            }
            TtaScope::Full => {
                let (copy, report) =
                    adapt_full(dec, &ex, PairSource::PassageFallback, &params.train)?;
                dec.device().synchronize()?;
                let a = t.elapsed().as_secs_f64() * 1e3;
                split.push([report.forward_ms, report.backward_ms, report.optimizer_ms]);
                let copy = copy.ok_or_else(|| anyhow::anyhow!("adaptation fell back"))?;
                let graphs = graphs && serve(&copy);
                let main = answer(&copy, None, ids, new_tokens, graphs)?;
                let other = match serve(&copy) {
                    true => Some(answer(&copy, None, ids, new_tokens, !graphs)?),
                    false => None,
                };
                (a, main, other)
            }
        };
        if run > 0 {
            let steps = (new_tokens.max(2) - 1) as f64;
            // The query's time is adaptation and the main answer, without the other one.
            total.push(adapt_ms + main.prefill_ms + main.decode_ms);
            adapt.push(adapt_ms);
            prefill.push(main.prefill_ms);
            per_token.push(main.decode_ms / steps);
            replayed |= main.replayed;
            nodes = nodes.or(main.nodes);
            if let Some(other) = other {
                other_per_token.push(other.decode_ms / steps);
                same &= main.tokens == other.tokens;
                replayed |= other.replayed;
                nodes = nodes.or(other.nodes);
            }
        }
    }
    let med = |v: &[f64]| crate::numeric::median(v);
    println!("model          {}", cfg.model.path.display());
    println!("device         {} {}", cfg.model.device, cfg.model.dtype);
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = dec.device() {
        let on = d.is_event_tracking();
        println!("buffer events  {}", if on { "on" } else { "off" });
    }
    println!(
        "query          {} prompt tokens, pairs of {pair_tokens:?} tokens, {new_tokens} new tokens, scope {:?}, median of {runs}",
        ids.len(),
        params.scope
    );
    println!("total          {:.1} ms per query", med(&total));
    let kept = match params.train.rebuilds_on(dec.device()) {
        true => "rebuilt in the backward pass",
        false => "kept",
    };
    println!("  adaptation   {:.1} ms (activations {kept})", med(&adapt));
    // The untimed first run's report is left out, as its times are.
    let part = |i: usize| med(&split.iter().skip(1).map(|s| s[i]).collect::<Vec<_>>());
    println!(
        "    steps      forward {:.1} ms, backward {:.1} ms, optimiser {:.1} ms; the rest is the \
         loss passes and setting up (on a GPU a phase's time lands where the host next waits)",
        part(0),
        part(1),
        part(2)
    );
    println!("  prefill      {:.1} ms", med(&prefill));
    let (main_way, other_way) = match (graphs, replayed) {
        (true, true) => ("step graphs, replayed", "op by op"),
        (true, false) => ("step graphs, ops one by one", "op by op"),
        (false, true) => ("op by op", "step graphs, replayed"),
        (false, false) => ("op by op", "step graphs, ops one by one"),
    };
    println!(
        "  decode       {:.2} ms per token ({main_way})",
        med(&per_token)
    );
    if !other_per_token.is_empty() {
        println!(
            "  decode       {:.2} ms per token ({other_way}; not in the total)",
            med(&other_per_token)
        );
        if let Some(n) = nodes {
            println!("  step graph   {n} nodes (launched by one replay)");
        }
        println!(
            "  same tokens  {}",
            if same {
                "yes"
            } else {
                "NO: the two ways answered differently"
            }
        );
    }
    Ok(())
}
