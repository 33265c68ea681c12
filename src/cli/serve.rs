//! `ttarag serve`.

use std::time::Duration;

use clap::Args;

use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
use crate::model::fingerprint::WeightsDigest;
use crate::server::{router, App};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to bind. Overrides server.host.
    #[arg(long, env = "TTARAG_HOST")]
    pub host: Option<String>,
    /// Port to bind (0 picks a free one). Overrides server.port.
    #[arg(long, env = "TTARAG_PORT")]
    pub port: Option<u16>,
    /// Model worker threads. Overrides server.workers.
    #[arg(long, env = "TTARAG_WORKERS")]
    pub workers: Option<usize>,
    /// Waiting requests beyond which new ones get 429. Overrides server.queue_capacity.
    #[arg(long, env = "TTARAG_QUEUE_CAPACITY")]
    pub queue_capacity: Option<usize>,
}

pub fn run(mut cfg: Config, a: ServeArgs) -> anyhow::Result<()> {
    if let Some(h) = a.host {
        cfg.server.host = h;
    }
    if let Some(p) = a.port {
        cfg.server.port = p;
    }
    if let Some(w) = a.workers {
        cfg.server.workers = w;
    }
    if let Some(q) = a.queue_capacity {
        cfg.server.queue_capacity = q;
    }
    // Keys come from the environment, never from flags, which any local user can read in the
    // process list.
    cfg.auth.apply_env(
        env_var("TTARAG_API_KEYS")?.as_deref(),
        env_var("TTARAG_ADMIN_KEY")?.as_deref(),
    )?;
    // Like the keys: a database URL carries a password.
    if let Some(url) = env_var("TTARAG_AB_POSTGRES_URL")? {
        cfg.ab.postgres_url = Some(url);
    }
    cfg.validate()?;
    if !cfg.auth.has_keys() && !is_loopback(&cfg.server.host) {
        let host = &cfg.server.host;
        eprintln!(
            "WARNING: serving on {host} with no API key: anyone who can reach this address can \
             use the server. Set TTARAG_API_KEYS (and TTARAG_ADMIN_KEY), or bind 127.0.0.1."
        );
        tracing::warn!(%host, "no API key configured on a non-loopback address");
    }
    let model = super::load_model(&cfg)?;
    let collections = super::open_collections(&cfg)?;
    // One digest for every artefact checked against the weights: they are hashed once.
    let weights = WeightsDigest::of(&cfg.model.path);
    let gate = match super::load_gate(&cfg, &model, &weights) {
        Ok(g) => g,
        // A server that gates by default cannot run without its gate; otherwise it serves
        // everything but mode `auto`, whose requests are told why.
        Err(e) if cfg.gate.default_mode == "auto" => return Err(e),
        Err(e) if cfg.ab.arms.iter().any(|a| a.mode == "auto") => {
            return Err(e.context("an [ab] arm runs mode `auto`"))
        }
        Err(e) => {
            let why = format!("{e:#}");
            tracing::warn!(error = %why, "gate refused; mode `auto` is unavailable");
            cfg.gate.probe = None;
            cfg.gate.refused = Some(why);
            None
        }
    };
    let adapt_gate = match super::load_adapt_gate(&cfg, &model, &weights) {
        Ok(g) => g,
        // Without it, `auto` requests that would adapt still adapt; those that ask for the
        // gate by name (`rag.gate.adapt`) are told why it is missing.
        Err(e)
            if cfg
                .ab
                .arms
                .iter()
                .any(|a| a.gate.as_ref().is_some_and(|g| g.adapt.is_some())) =>
        {
            return Err(e.context("an [ab] arm runs the adaptation gate"))
        }
        Err(e) => {
            let why = format!("{e:#}");
            tracing::warn!(error = %why, "adaptation gate refused; auto requests adapt ungated");
            cfg.gate.adapt_probe = None;
            cfg.gate.adapt_refused = Some(why);
            None
        }
    };
    let engine = Engine::start(
        model.clone(),
        collections,
        &EngineConfig {
            workers: cfg.server.workers,
            queue_capacity: cfg.server.queue_capacity,
            prompt_template: cfg.retrieval.prompt_template.clone(),
            collection_templates: cfg.collection_templates(),
            gate,
            adapt_gate,
            request_timeout: Some(std::time::Duration::from_millis(
                cfg.server.request_timeout_ms,
            )),
            max_prompt_tokens: cfg.server.max_prompt_tokens,
            domain: Some(crate::adapt::domain::DomainAdapters::for_model(
                &cfg.domain.dir,
                &model,
                &weights,
            )),
            batch: crate::engine::BatchLimits::of(&cfg.server),
            faults: Default::default(),
        },
    )?;
    // Beside the weights, what requests may hold: each budget is reserved before it is used.
    tracing::info!(
        kv_cache_mb = cfg.server.kv_cache_mb,
        adapt_memory_mb = cfg.server.adapt_memory_mb,
        max_running = cfg.server.max_running,
        "memory budgets"
    );
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let app = App::new(engine, cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))?;
        let local = listener.local_addr()?;
        let replica = match &app.config.server.replica_id {
            Some(r) => r.clone(),
            None => format!("{}:{}", hostname(), local.port()),
        };
        app.set_replica(&replica);
        // A shared experiment is checked before any traffic: differing arms refuse the start.
        app.ab.open(&app.config.ab, &replica).await?;
        // Listening now, ready (`/ready`) once what the first request would make is made.
        app.set_warming(true);
        let warming = app.clone();
        std::thread::Builder::new()
            .name("warm-up".into())
            .spawn(move || crate::server::warm_up(&warming))?;
        // Tests and scripts wait for this exact line.
        println!("listening on http://{local}");
        tracing::info!(%local, "serving");
        let drain = Duration::from_millis(app.config.server.drain_timeout_ms);
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        let server = axum::serve(listener, router(app.clone())).with_graceful_shutdown({
            let app = app.clone();
            async move {
                shutdown_signal().await;
                drain_in_flight(&app, drain).await;
                let _ = drained_tx.send(());
            }
        });
        // Connections still open once the drain is over (a request past the drain deadline,
        // an idle keep-alive client) must not hold the exit.
        let linger = async move {
            if drained_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        tokio::select! {
            r = server => r?,
            _ = linger => tracing::warn!("connections still open after the drain; exiting"),
        }
        app.ab.close(Duration::from_secs(5)).await;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Stops taking requests (503, `/health` says draining) and waits until those in flight have
/// finished or `deadline` has passed.
async fn drain_in_flight(app: &App, deadline: Duration) {
    app.start_draining();
    let until = tokio::time::Instant::now() + deadline;
    tracing::info!(in_flight = app.in_flight(), ?deadline, "draining");
    while app.in_flight() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match app.in_flight() {
        0 => tracing::info!("drained"),
        n => tracing::warn!(
            in_flight = n,
            "drain deadline passed; exiting with requests in flight"
        ),
    }
}

/// This machine's host name, for the default replica name.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A variable's value; `None` when unset. One that is not UTF-8 is an error rather than
/// ignored, since ignoring a key variable could leave the server open.
fn env_var(name: &str) -> anyhow::Result<Option<String>> {
    match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("{name} is not valid UTF-8"),
    }
}

/// Whether `host` (as in `server.host`) binds only this machine: 127.0.0.0/8, ::1 or
/// localhost.
fn is_loopback(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Ctrl-C or SIGTERM (what `docker stop` sends): stop accepting, let running requests finish.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_loopback_hosts_count_as_local() {
        for h in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "localhost",
            "LocalHost",
            "::ffff:127.0.0.1",
        ] {
            assert!(super::is_loopback(h), "{h}");
        }
        for h in [
            "0.0.0.0",
            "::",
            "192.168.1.5",
            "example.com",
            "localhost.evil.com",
            "",
        ] {
            assert!(!super::is_loopback(h), "{h}");
        }
    }
}
