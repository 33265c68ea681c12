//! `ttarag bench --query N`: whole test-time-adapted answers at a fixed shape: a
//! `--prompt-tokens` RAG prompt, three training pairs of about 96 tokens, adaptation with the
//! `[tta]` scope, then the prompt's prefill and `--new-tokens` greedy tokens through the
//! adapted model. Each phase ends with a device synchronisation, so GPU figures are whole.

use std::time::Instant;

use candle_core::Tensor;

use crate::adapt::{adapt_full, adapt_lora, encode_pairs, Pair, PairSource};
use crate::config::Config;
use crate::engine::{resolve_tta, TtaOverrides, TtaScope};
use crate::model::{Adapter, Decoder, ForwardOpts, Logits, Model};

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

/// Greedy answer of `new_tokens` tokens to `ids` through `dec` (with `adapter`).
fn answer(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    ids: &[u32],
    new_tokens: usize,
) -> anyhow::Result<(f64, f64)> {
    let opts = ForwardOpts {
        logits: Logits::Last,
        adapter,
        ..Default::default()
    };
    let mut cache = dec.new_cache(ids.len() + new_tokens);
    let t = Instant::now();
    let input = Tensor::new(ids, dec.device())?.unsqueeze(0)?;
    let logits = dec.forward(&input, Some(&mut cache), &opts)?.logits;
    let mut next = logits
        .expect("logits")
        .squeeze(0)?
        .argmax(0)?
        .to_scalar::<u32>()?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    for _ in 1..new_tokens {
        let input = Tensor::new(&[next], dec.device())?.unsqueeze(0)?;
        let logits = dec.forward(&input, Some(&mut cache), &opts)?.logits;
        next = logits
            .expect("logits")
            .squeeze(0)?
            .argmax(0)?
            .to_scalar::<u32>()?;
    }
    dec.device().synchronize()?;
    Ok((prefill_ms, t.elapsed().as_secs_f64() * 1e3))
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
    let (mut total, mut adapt, mut prefill, mut per_token) = (vec![], vec![], vec![], vec![]);
    // One untimed query first: kernel loading and the allocator's first large buffers.
    for run in 0..=runs {
        dec.device().synchronize()?;
        let t = Instant::now();
        let (adapt_ms, (pre, dec_ms)) = match params.scope {
            TtaScope::Lora => {
                let (lora, _) =
                    adapt_lora(dec, None, &ex, PairSource::PassageFallback, &params.train)?;
                dec.device().synchronize()?;
                let a = t.elapsed().as_secs_f64() * 1e3;
                let lora = lora.ok_or_else(|| anyhow::anyhow!("adaptation fell back"))?;
                (a, answer(dec, Some(&lora), ids, new_tokens)?)
            }
            TtaScope::Full => {
                let (copy, _) = adapt_full(dec, &ex, PairSource::PassageFallback, &params.train)?;
                dec.device().synchronize()?;
                let a = t.elapsed().as_secs_f64() * 1e3;
                let copy = copy.ok_or_else(|| anyhow::anyhow!("adaptation fell back"))?;
                (a, answer(&copy, None, ids, new_tokens)?)
            }
        };
        if run > 0 {
            total.push(t.elapsed().as_secs_f64() * 1e3);
            adapt.push(adapt_ms);
            prefill.push(pre);
            per_token.push(dec_ms / (new_tokens.max(2) - 1) as f64);
        }
    }
    let med = |v: &[f64]| crate::numeric::median(v);
    println!("model          {}", cfg.model.path.display());
    println!("device         {} {}", cfg.model.device, cfg.model.dtype);
    println!(
        "query          {} prompt tokens, pairs of {pair_tokens:?} tokens, {new_tokens} new tokens, scope {:?}, median of {runs}",
        ids.len(),
        params.scope
    );
    println!("total          {:.1} ms per query", med(&total));
    println!("  adaptation   {:.1} ms", med(&adapt));
    println!("  prefill      {:.1} ms", med(&prefill));
    println!("  decode       {:.2} ms per token", med(&per_token));
    Ok(())
}
