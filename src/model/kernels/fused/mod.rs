//! Differentiable ops fused into one candle op each, for the few-row passes of adaptation on
//! the CPU in f32. Composed from candle's elementwise ops, a block's backward is hundreds of
//! tiny ops, each allocating, zero-filling and adding its gradient: at ~24 rows that
//! bookkeeping cost as much as the block's matrix products. Each op here does its forward in
//! one pass and its backward in another. On a GPU the block keeps its composed shape but its
//! norms, rotary embedding, softmax and activation take these ops' CUDA bodies
//! (`cuda::training_ops`), one launch each way instead of five to a dozen; with `[model]
//! cuda_fused_training` an f32 block takes the whole fused path, attention included
//! (`cuda::training_attention`). Elsewhere (bf16 or f64 on the CPU) the composed path runs,
//! which these ops are tested against.

mod attention;
mod lora;
mod rms_norm;
mod rope;
mod softmax;
mod swiglu;

use candle_core::{CpuStorage, DType, Device, Layout, Result, Tensor};

pub use attention::{causal_attention, MAX_POSITIONS};
pub use lora::{lora_delta, lora_takes, MAX_RANK as LORA_MAX_RANK};
pub use rms_norm::rms_norm;
pub use rope::rope;
pub use softmax::softmax_last_dim;
pub use swiglu::swiglu;

/// Whether a whole block's fused path takes `x`: f32 on the CPU, or f32 and bf16 on a GPU with
/// `[model] cuda_fused_training` (`cuda::fused_training`).
pub fn applies(x: &Tensor) -> bool {
    takes(x.dtype(), x.device())
}

/// [`applies`] for tensors of `dtype` on `device`.
pub fn takes(dtype: DType, device: &Device) -> bool {
    match device {
        Device::Cpu => dtype == DType::F32,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            matches!(dtype, DType::F32 | DType::BF16)
                && crate::model::kernels::cuda::fused_training()
        }
        _ => false,
    }
}

/// The f32 elements of a contiguous CPU storage.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("fused op: f32 only");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("fused op: contiguous input only"),
    }
}

/// Runs `f` on the f32 elements of `t` (made contiguous), which must be on the CPU.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => Ok(f(slice(c, l)?)),
        _ => candle_core::bail!("fused op: CPU tensors only"),
    }
}

/// Dot product with eight running sums (the compiler vectorizes these, not one sum).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha * x`.
#[inline(always)]
pub(super) fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[cfg(test)]
mod tests;
