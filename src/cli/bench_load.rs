//! `ttarag bench --load 1,2,4,8,16`: the engine under concurrent clients. Each client submits
//! QASC dev questions one after another through the same `Engine` the server runs (its
//! `[server]` workers and queue), so the figures are the engine's, without HTTP. Prints a
//! table; asserts nothing. Request `i` is the same job at every level (its question and seed,
//! greedy), so the table also says how many answers equal the fewest clients' own: under
//! concurrency an answer must not change (a race between threads' GPU streams would show here).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;

use super::usage::{cpu_seconds, peak_rss_mb, reset_peak_rss};
use crate::config::Config;
use crate::engine::{
    resolve_tta, ChatJob, DecodeCounts, Engine, EngineConfig, RagMode, RagParams, Timings,
    TtaOverrides,
};
use crate::eval::dataset::{load_questions, select, Part, Subset};
use crate::eval::runner::complete;
use crate::eval::stats::quantile;
use crate::generate::GenParams;
use crate::model::{ChatMessage, Model};

/// What one request did.
struct Sample {
    /// Which of the level's jobs it answered, and its text where it did.
    job: usize,
    answer: Option<String>,
    latency_ms: f64,
    tokens: usize,
    prompt_tokens: usize,
    timings: Timings,
    ok: bool,
}

/// One level of the sweep.
struct Level {
    mode: &'static str,
    clients: usize,
    wall_s: f64,
    samples: Vec<Sample>,
    peak_rss_mb: Option<f64>,
    /// CPU seconds the process used during the level (every thread).
    cpu_s: Option<f64>,
    /// The scheduler's decode steps during the level.
    decode: DecodeCounts,
}

fn job(cfg: &Config, question: &str, mode: RagMode, seed: u64) -> anyhow::Result<ChatJob> {
    let tta = match mode {
        RagMode::Tta => Some(
            resolve_tta(&cfg.tta, &TtaOverrides::default(), seed)
                .map_err(|e| anyhow::anyhow!("[tta]: {}", e.message))?,
        ),
        _ => None,
    };
    Ok(ChatJob {
        messages: vec![
            ChatMessage::new("system", "Answer the question with a short phrase."),
            ChatMessage::new("user", question),
        ],
        gen: GenParams {
            max_tokens: 24,
            temperature: 0.0,
            top_p: 1.0,
            seed,
            stop: vec![],
        },
        rag: RagParams::plain(mode, cfg.retrieval.collection.clone(), cfg.retrieval.top_k),
        tta,
    })
}

/// `clients` threads share `requests` submissions of `questions` (in turn) until all are done.
fn run_level(
    cfg: &Config,
    engine: &Engine,
    questions: &[String],
    mode: RagMode,
    clients: usize,
    requests: usize,
) -> anyhow::Result<(f64, Vec<Sample>)> {
    let jobs: Vec<ChatJob> = (0..requests)
        .map(|i| job(cfg, &questions[i % questions.len()], mode, i as u64))
        .collect::<anyhow::Result<_>>()?;
    let jobs = Mutex::new(jobs.into_iter().enumerate());
    let samples = Mutex::new(Vec::with_capacity(requests));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..clients {
            s.spawn(|| loop {
                let Some((i, job)) = jobs.lock().ok().and_then(|mut j| j.next()) else {
                    return;
                };
                let t = Instant::now();
                let done = complete(engine, job);
                let latency_ms = t.elapsed().as_secs_f64() * 1e3;
                let sample = match done {
                    Ok(c) => Sample {
                        job: i,
                        answer: Some(c.text),
                        latency_ms,
                        tokens: c.completion_tokens,
                        prompt_tokens: c.prompt_tokens,
                        timings: c.rag.timings_ms,
                        ok: true,
                    },
                    Err(_) => Sample {
                        job: i,
                        answer: None,
                        latency_ms,
                        tokens: 0,
                        prompt_tokens: 0,
                        timings: Timings::default(),
                        ok: false,
                    },
                };
                if let Ok(mut v) = samples.lock() {
                    v.push(sample);
                }
            });
        }
    });
    let wall = t0.elapsed().as_secs_f64();
    let samples = samples.into_inner().unwrap_or_default();
    Ok((wall, samples))
}

pub fn run(
    cfg: &Config,
    model: Arc<Model>,
    clients: &[usize],
    modes: &[String],
    chart: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        clients.iter().all(|&c| (1..=256).contains(&c)),
        "--load: client counts must be within 1..=256"
    );
    let modes: Vec<(&'static str, RagMode)> = modes
        .iter()
        .map(|m| match m.as_str() {
            "static" => Ok(("static", RagMode::Static)),
            "tta" => Ok(("tta", RagMode::Tta)),
            "none" => Ok(("none", RagMode::None)),
            other => anyhow::bail!("--modes: `{other}` is not one of static, tta, none"),
        })
        .collect::<anyhow::Result<_>>()?;
    let path = std::path::Path::new("data/qasc/questions.jsonl");
    let subset = Subset {
        part: Part::Dev,
        limit: Some(24),
        ..Default::default()
    };
    let questions: Vec<String> = select(load_questions(path)?, &subset)
        .into_iter()
        .map(|q| q.question)
        .collect();
    anyhow::ensure!(
        !questions.is_empty(),
        "{}: no dev questions",
        path.display()
    );
    let collections = super::open_collections(cfg)?;
    collections
        .get(&cfg.retrieval.collection)
        .with_context(|| format!("collection `{}`", cfg.retrieval.collection))?;
    let engine = Engine::start(
        model,
        collections,
        &EngineConfig {
            workers: cfg.server.workers,
            queue_capacity: cfg.server.queue_capacity,
            prompt_template: cfg.retrieval.prompt_template.clone(),
            collection_templates: cfg.collection_templates(),
            max_prompt_tokens: cfg.server.max_prompt_tokens,
            batch: crate::engine::BatchLimits::of(&cfg.server),
            ..Default::default()
        },
    )?;
    let mut levels = Vec::new();
    for &(name, mode) in &modes {
        // Warm-up: first-touch page faults and lazily made weight copies stay out of the figures.
        run_level(cfg, &engine, &questions, mode, 1, 2)?;
        for &c in clients {
            let requests = (2 * c).max(8);
            reset_peak_rss();
            let cpu0 = cpu_seconds();
            let decode0 = engine.health().decode_counts();
            let (wall_s, samples) = run_level(cfg, &engine, &questions, mode, c, requests)?;
            levels.push(Level {
                mode: name,
                clients: c,
                wall_s,
                samples,
                peak_rss_mb: peak_rss_mb(),
                cpu_s: cpu0.zip(cpu_seconds()).map(|(a, b)| b - a),
                decode: engine.health().decode_counts().since(decode0),
            });
            eprintln!("{name} x{c}: {requests} requests in {wall_s:.1} s");
        }
    }
    print_table(cfg, &levels);
    if let Some(prefix) = chart {
        draw(prefix, &levels)?;
    }
    Ok(())
}

/// Of the jobs `l` and its mode's first level (the fewest clients) both answered, how many
/// answers are the same text: `(same, compared)`.
fn agreement(levels: &[Level], l: &Level) -> (usize, usize) {
    let Some(first) = levels.iter().find(|r| r.mode == l.mode) else {
        return (0, 0);
    };
    let reference: std::collections::HashMap<usize, &str> = first
        .samples
        .iter()
        .filter_map(|s| Some((s.job, s.answer.as_deref()?)))
        .collect();
    let pairs = l
        .samples
        .iter()
        .filter_map(|s| Some((reference.get(&s.job)?, s.answer.as_deref()?)));
    pairs.fold((0, 0), |(same, n), (a, b)| {
        (same + usize::from(*a == b), n + 1)
    })
}

/// Answered requests' latencies of a level.
fn latencies(l: &Level) -> Vec<f64> {
    l.samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.latency_ms)
        .collect()
}

/// Throughput and p99 latency against clients, one line per mode.
fn draw(prefix: &std::path::Path, levels: &[Level]) -> anyhow::Result<()> {
    use crate::eval::plot::{plot_lines, Series};
    let mut modes: Vec<&str> = levels.iter().map(|l| l.mode).collect();
    modes.dedup();
    let series = |f: &dyn Fn(&Level) -> f64| -> Vec<Series> {
        modes
            .iter()
            .map(|m| Series {
                name: m.to_string(),
                points: levels
                    .iter()
                    .filter(|l| l.mode == *m)
                    .map(|l| (l.clients, f(l)))
                    .collect(),
            })
            .collect()
    };
    let path = |what: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(format!("-{what}.png"));
        std::path::PathBuf::from(name)
    };
    let throughput = series(&|l| latencies(l).len() as f64 / l.wall_s);
    let p99 = series(&|l| quantile(&latencies(l), 0.99));
    let (t, p) = (path("throughput"), path("p99"));
    plot_lines(
        &t,
        "Throughput under concurrent clients",
        "clients",
        "req/s",
        &throughput,
        None,
    )?;
    plot_lines(
        &p,
        "p99 latency under concurrent clients",
        "clients",
        "p99 ms",
        &p99,
        None,
    )?;
    eprintln!("wrote {} and {}", t.display(), p.display());
    Ok(())
}

fn print_table(cfg: &Config, levels: &[Level]) {
    println!("model          {}", cfg.model.path.display());
    println!(
        "engine         {} stage worker(s), queue {}, batch of {} at most, {} threads; 24 QASC dev questions, greedy, 24 new tokens",
        cfg.server.workers,
        cfg.server.queue_capacity,
        cfg.server.max_running,
        candle_core::utils::get_num_threads()
    );
    println!();
    println!("| mode | clients | requests | failed | req/s | p50 ms | p99 ms | decode tok/s | cores busy | CPU ms/request | peak RSS MB | same answers |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for l in levels {
        let (same, compared) = agreement(levels, l);
        let lat = latencies(l);
        let ok = lat.len();
        let tokens: usize = l.samples.iter().map(|s| s.tokens).sum();
        let rss = l.peak_rss_mb.map_or("–".into(), |p| format!("{p:.0}"));
        let (busy, per_request) = match l.cpu_s {
            Some(c) => (
                format!("{:.2}", c / l.wall_s),
                format!("{:.0}", c * 1e3 / l.samples.len().max(1) as f64),
            ),
            None => ("–".into(), "–".into()),
        };
        println!(
            "| {} | {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.1} | {busy} | {per_request} | {} | {same}/{compared} |",
            l.mode,
            l.clients,
            l.samples.len(),
            l.samples.len() - ok,
            ok as f64 / l.wall_s,
            quantile(&lat, 0.5),
            quantile(&lat, 0.99),
            tokens as f64 / l.wall_s,
            rss
        );
    }
    println!();
    println!("p50/p99 interpolate between a level's requests (2 per client, at least 8). Same answers: of the jobs both answered, how many give the text the mode's fewest-clients level gave.");
    println!();
    println!("Where a request's time goes (mean ms over its level's answered requests; queue includes waiting for the batch):");
    println!();
    println!("| mode | clients | prompt tokens | queue | retrieve | adapt | prefill | decode |");
    println!("|---|---|---|---|---|---|---|---|");
    for l in levels {
        let ok: Vec<&Sample> = l.samples.iter().filter(|s| s.ok).collect();
        let mean = |f: &dyn Fn(&Sample) -> f64| {
            ok.iter().map(|s| f(s)).sum::<f64>() / ok.len().max(1) as f64
        };
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            l.mode,
            l.clients,
            mean(&|s| s.prompt_tokens as f64),
            mean(&|s| s.timings.queue),
            mean(&|s| s.timings.retrieve),
            mean(&|s| s.timings.adapt),
            mean(&|s| s.timings.prefill),
            mean(&|s| s.timings.decode),
        );
    }
    println!();
    println!("The scheduler's decode steps (a step graph per batch size class, made again where it cannot take a batch; rows that join or leave rebind it in place; on a GPU each graph made is a capture, and later steps replay it):");
    println!();
    println!(
        "| mode | clients | decode steps | step graphs made | steps rebound | steps replayed | steps per graph |"
    );
    println!("|---|---|---|---|---|---|---|");
    for l in levels {
        let d = l.decode;
        let per_graph = match d.graphs {
            0 => "–".to_string(),
            g => format!("{:.1}", d.steps as f64 / g as f64),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {per_graph} |",
            l.mode, l.clients, d.steps, d.graphs, d.rebound, d.replayed,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(clients: usize, answers: &[(usize, Option<&str>)]) -> Level {
        Level {
            mode: "tta",
            clients,
            wall_s: 1.0,
            samples: answers
                .iter()
                .map(|&(job, a)| Sample {
                    job,
                    answer: a.map(str::to_string),
                    latency_ms: 1.0,
                    tokens: 1,
                    prompt_tokens: 1,
                    timings: Timings::default(),
                    ok: a.is_some(),
                })
                .collect(),
            peak_rss_mb: None,
            cpu_s: None,
            decode: DecodeCounts::default(),
        }
    }

    /// A level's answers are compared job by job with its mode's first level, over the jobs
    /// both answered.
    #[test]
    fn answers_are_compared_job_by_job_with_the_fewest_clients() {
        let one = level(1, &[(0, Some("a")), (1, Some("b")), (2, None)]);
        let many = level(
            8,
            &[
                (1, Some("x")),
                (0, Some("a")),
                (2, Some("c")),
                (9, Some("d")),
            ],
        );
        let levels = [one, many];
        assert_eq!(agreement(&levels, &levels[0]), (2, 2));
        assert_eq!(agreement(&levels, &levels[1]), (1, 2));
    }
}
