//! Gradient norms and global-norm clipping.

use candle_core::{DType, Result, Tensor};

/// Global L2 norm of `grads`.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads {
        sq += sum_of_squares(g)?;
    }
    Ok(sq.sqrt())
}

/// Sum of squared elements; on the CPU in f32 it reads the buffer directly instead of
/// allocating a squared copy (full-scope gradients are as large as the model).
pub(super) fn sum_of_squares(g: &Tensor) -> Result<f64> {
    use rayon::prelude::*;
    if g.device().is_cpu() && g.dtype() == DType::F32 && g.is_contiguous() {
        let (storage, layout) = g.storage_and_layout();
        if let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) = &*storage {
            let v = &v[layout.start_offset()..layout.start_offset() + g.elem_count()];
            return Ok(v.par_chunks(1 << 14).map(chunk_sum_of_squares).sum());
        }
    }
    g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Sum of squares of `c` in f64 over 32 independent partial sums: one running sum would be a
/// chain of dependent adds that the compiler may not reorder, several times slower than
/// reading the gradients (full scope reads all 135M of SmolLM2's).
pub(super) fn chunk_sum_of_squares(c: &[f32]) -> f64 {
    const LANES: usize = 32;
    let mut acc = [0f64; LANES];
    let mut lanes = c.chunks_exact(LANES);
    for l in &mut lanes {
        for (a, &x) in acc.iter_mut().zip(l) {
            *a += (x as f64) * (x as f64);
        }
    }
    let rest: f64 = lanes
        .remainder()
        .iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum();
    acc.iter().sum::<f64>() + rest
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm`; returns the norm.
pub fn clip_global_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm > max_norm {
        let k = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * k)?;
        }
    }
    Ok(norm)
}
