//! A sequence of candle ops captured once as a CUDA graph and replayed with one launch. A decode
//! step is some 20 launches per layer whose work is a few microseconds each: replayed, the
//! step costs the GPU's time instead of the host's launch overhead.
//!
//! What capture needs from the ops, and where it comes from:
//! - no upload or read-back inside: step inputs lie in device buffers written between replays
//!   (`Decoder::device_step`); candle's small parameter uploads (layouts) come from its
//!   capture cache, filled by one run of the same ops just before with the cache turned on;
//! - allocations made and freed inside (stream-ordered, as candle's are): the result is copied
//!   into a buffer allocated before the capture and dropped inside it, so the graph owns no
//!   memory across replays;
//! - one stream: candle's device uses the calling thread's default stream, so a capture, its
//!   replays and the reads of its result run on one thread at a time (the caller's).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;
use candle_core::{CudaDevice, Result, Tensor};

/// Whether decode steps replay captured graphs: `[model] cuda_graphs` at start, turned off for
/// the process by the first capture or replay that fails.
static ENABLED: AtomicBool = AtomicBool::new(true);

pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A captured sequence of ops and the buffer its result lands in on every replay.
pub struct Graph {
    graph: CudaGraph,
    out: Tensor,
}

/// Turns candle's capture cache on for `f`: small uploads `f` makes are kept by content, so
/// that a capture of the same ops right after finds them. Run the ops once under it first.
pub fn with_upload_cache<R>(dev: &CudaDevice, f: impl FnOnce() -> R) -> R {
    let _cache = dev.enable_cuda_graph_htod_cache();
    f()
}

// SAFETY: CUDA graph objects may be used from any thread as long as no two threads use one
// at once; a `Graph` is only reached through its owner (`&self` of one step at a time, the
// owner's `&mut` upstream), and `Graph` is not `Sync`.
unsafe impl Send for Graph {}

impl Graph {
    /// Captures `f` on `dev`'s stream without running it. `out` (allocated by the caller,
    /// contiguous) receives `f`'s result, of the same shape and dtype, on every replay. Run
    /// `f` once under [`with_upload_cache`] just before, on this thread.
    pub fn capture(
        dev: &CudaDevice,
        out: Tensor,
        f: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Self> {
        if !out.is_contiguous() {
            candle_core::bail!("graph capture: the result buffer must be contiguous");
        }
        let stream = dev.cuda_stream();
        let _cache = dev.enable_cuda_graph_htod_cache();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(candle_core::Error::wrap)?;
        // Every tensor `f` makes, its result included, is dropped before the capture ends: the
        // graph frees what it allocates.
        let ran = f().and_then(|y| {
            if y.dims() != out.dims() || y.dtype() != out.dtype() {
                candle_core::bail!(
                    "graph capture: a result of {:?} {:?} for a buffer of {:?} {:?}",
                    y.dims(),
                    y.dtype(),
                    out.dims(),
                    out.dtype()
                );
            }
            out.slice_set(&y.contiguous()?, 0, 0)
        });
        // The capture ends whatever happened, or the stream would stay in capture mode.
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        ran?;
        match ended.map_err(candle_core::Error::wrap)? {
            Some(graph) => {
                graph.upload().map_err(candle_core::Error::wrap)?;
                Ok(Self { graph, out })
            }
            None => candle_core::bail!("graph capture: nothing was captured"),
        }
    }

    /// The graph's nodes (kernels, copies, allocations and frees): what one replay launches,
    /// the count that fused kernels bring down.
    pub fn nodes(&self) -> Result<usize> {
        let mut n = 0usize;
        // SAFETY: the graph lives as long as `self`; a null node array asks for the count.
        unsafe { sys::cuGraphGetNodes(self.graph.cu_graph(), std::ptr::null_mut(), &mut n) }
            .result()
            .map_err(candle_core::Error::wrap)?;
        Ok(n)
    }

    /// Runs the captured ops once more (on the calling thread's stream, after what it has
    /// queued); returns the result buffer, which the next replay overwrites.
    pub fn replay(&self) -> Result<&Tensor> {
        self.graph.launch().map_err(candle_core::Error::wrap)?;
        Ok(&self.out)
    }
}
