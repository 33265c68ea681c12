//! cudarc's per-buffer events. With tracking on (cudarc's default), every device buffer is
//! born with two events (its last read and last write) and destroys them when freed: two
//! `cuEventCreate` and two `cuEventDestroy` per tensor, so per candle op, on the host thread
//! that launches it. cudarc records and waits on them only in a context with streams of its
//! own making (`CudaContext::new_stream`); candle's device runs every thread on that thread's
//! default stream, which makes none. There the events order nothing, and turning them off
//! changes no ordering: what crosses threads is ordered by draining the stream that wrote it
//! before the hand-over (the stage workers, the model's load), as it already had to be.

use candle_core::CudaDevice;

/// Turns the events on or off for the buffers `dev` makes from now on (`[model]
/// cuda_event_tracking`). Returns whether they are on: off is refused (and they stay on) where
/// the context already has streams of its own, since cudarc orders those through the events.
pub fn set_tracking(dev: &CudaDevice, on: bool) -> bool {
    let ctx = dev.cuda_stream().context().clone();
    if on || ctx.is_in_multi_stream_mode() {
        // SAFETY: tracking on is cudarc's default, the safe mode.
        unsafe { ctx.enable_event_tracking() };
        return true;
    }
    // SAFETY: cudarc's conditions for turning tracking off are that no buffer is freed, read
    // or written on another stream before the work of its own stream on it is done. The
    // context has no stream of cudarc's making (checked above), and candle's device queues
    // every op on the calling thread's default stream, so a buffer met on another thread is
    // one whose writer drained its stream before handing it over; the events were never
    // recorded or waited on in this mode, so the same order holds without them.
    unsafe { ctx.disable_event_tracking() };
    false
}
