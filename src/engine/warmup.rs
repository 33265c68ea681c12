//! Warm-up at start: a server's first requests would otherwise pay for what is made once per
//! process (the pool's threads, first-touch pages of the decode copies and KV buffers, the
//! frozen weights' bf16 copy that adaptation makes at its first step, CUDA's kernel loading).
//! Run through the engine's own path, so whatever a request would make first is made here.

use std::time::{Duration, Instant};

use super::{ChatJob, Engine, EngineError, Event, RagMode, RagParams, TtaParams};
use crate::generate::GenParams;
use crate::model::ChatMessage;

/// What the warm-up took.
#[derive(Debug, Clone, Copy)]
pub struct WarmUp {
    /// A two-token answer without retrieval: prefill and decode kernels.
    pub answer: Duration,
    /// A one-step adaptation on `collection`, when asked for.
    pub adapt: Option<Duration>,
}

fn job(mode: RagMode, collection: &str, tta: Option<TtaParams>) -> ChatJob {
    ChatJob {
        messages: vec![ChatMessage::new("user", "What do plants need to grow?")],
        gen: GenParams {
            max_tokens: 2,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: vec![],
        },
        rag: RagParams::plain(mode, collection, 2),
        tta,
    }
}

/// Runs `job` to its end on the calling thread.
fn run(engine: &Engine, job: ChatJob) -> Result<Duration, EngineError> {
    let t = Instant::now();
    let mut ticket = engine.submit(job)?;
    loop {
        match ticket.blocking_recv() {
            Some(Event::Text(_)) => {}
            Some(Event::Done(_)) => return Ok(t.elapsed()),
            Some(Event::Error(e)) => return Err(e),
            None => return Err(EngineError::Stopped),
        }
    }
}

/// A short answer, then (with `tta`: settings whose steps the caller keeps small) one
/// adaptation on `collection`. Blocks; call it off the async runtime.
pub fn warm_up(
    engine: &Engine,
    collection: &str,
    tta: Option<TtaParams>,
) -> Result<WarmUp, EngineError> {
    // The project's own CUDA kernels: every module, including those this warm-up's two
    // requests would not reach (a batch's, bf16's). A driver that cannot load them leaves
    // candle's ops serving rather than failing requests later.
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = engine.model.decoder.device() {
        if crate::model::cuda::enabled() {
            if let Err(e) = crate::model::cuda::preload(d) {
                tracing::warn!(error = %e, "the CUDA kernels did not load; candle's ops serve");
                crate::model::cuda::set_enabled(false);
            }
        }
    }
    let both = || -> Result<WarmUp, EngineError> {
        let answer = run(engine, job(RagMode::None, collection, None))?;
        let adapt = match &tta {
            Some(p) => Some(run(engine, job(RagMode::Tta, collection, Some(p.clone())))?),
            None => None,
        };
        Ok(WarmUp { answer, adapt })
    };
    let done = both();
    // The warm-up's two requests run every kernel a request would (prefill, adaptation, a
    // captured decode step with an adapter): one that fails here would fail every request,
    // so the project's kernels are turned off and candle's ops are tried instead.
    #[cfg(feature = "cuda")]
    if let Err(e) = &done {
        if engine.model.decoder.device().is_cuda() && crate::model::cuda::enabled() {
            tracing::warn!(error = %e, "the warm-up failed on the project's CUDA kernels; candle's ops serve");
            crate::model::cuda::set_enabled(false);
            return both();
        }
    }
    done
}
