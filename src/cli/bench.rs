//! `ttarag bench`: prefill and decode throughput, time to first token and peak memory for a
//! RAG-sized prompt, on the configured model and device. Prints figures; asserts nothing.

use std::time::Instant;

use candle_core::Tensor;
use clap::Args;

use crate::config::Config;
use crate::model::{ChatMessage, ForwardOpts, Logits};

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
}

/// Peak resident memory of this process in MB (Linux), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn rag_prompt(
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
        let text = model.render_chat(&[ChatMessage::new(
            "user",
            &format!("Context:\n{context}\nQuestion: What do plants need to grow?"),
        )])?;
        let ids = model.tokenizer.encode(&text)?;
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
    let ids = rag_prompt(&cfg, &model, a.prompt_tokens)?;
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
