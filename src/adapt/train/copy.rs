//! Full scope's private copy of the weights it trains.

use candle_core::{Result, Tensor, Var};

/// A copy of `w` to train. On the CPU in f32 every thread copies a part: the copy is most of
/// full scope's set-up (540 MB of fresh pages for SmolLM2, whose first touch is the slow part).
pub(super) fn trained_copy(w: &Tensor) -> Result<Var> {
    use rayon::prelude::*;
    let (storage, layout) = w.storage_and_layout();
    let src = match (&*storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
        _ => return Var::from_tensor(w),
    };
    const CHUNK: usize = 1 << 16;
    let mut dst = Vec::with_capacity(src.len());
    dst.spare_capacity_mut()[..src.len()]
        .par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, &s) in d.iter_mut().zip(s) {
                d.write(s);
            }
        });
    // SAFETY: the loop above wrote all `src.len()` elements.
    unsafe { dst.set_len(src.len()) };
    Var::from_vec(dst, w.shape(), w.device())
}
