//! `ttarag serve`.

use clap::Args;

use crate::config::Config;
use crate::engine::{Engine, EngineConfig};
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
    cfg.validate()?;
    let model = super::load_model(&cfg)?;
    let collections = super::open_collections(&cfg)?;
    let gate = match super::load_gate(&cfg, &model) {
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
    let engine = Engine::start(
        model,
        collections,
        &EngineConfig {
            workers: cfg.server.workers,
            queue_capacity: cfg.server.queue_capacity,
            prompt_template: cfg.retrieval.prompt_template.clone(),
            gate,
        },
    )?;
    let addr = format!("{}:{}", cfg.server.host, cfg.server.port);
    let app = App::new(engine, cfg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot bind {addr}: {e}"))?;
        let local = listener.local_addr()?;
        // Tests and scripts wait for this exact line.
        println!("listening on http://{local}");
        tracing::info!(%local, "serving");
        axum::serve(listener, router(app))
            .with_graceful_shutdown(shutdown_signal())
            .await?;
        Ok(())
    })
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
