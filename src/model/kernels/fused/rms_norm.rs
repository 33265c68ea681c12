//! `y = x / rms(x) * w` over the last dimension, with its backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{slice, with_f32};

struct RmsNorm {
    eps: f32,
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss = super::dot(x, x);
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let n = w.len();
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let r = inv_rms(xr, self.eps);
            for ((yi, xi), wi) in yr.iter_mut().zip(xr).zip(w) {
                *yi = xi * r * wi;
            }
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::model::kernels::cuda::training_ops::rms_norm_fwd(s1, l1, s2, l2, self.eps)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dx = r (g*w) - x r^3 / n * sum(g*w*x);  dw = sum over rows of g * x * r.
        let want_w = w.track_op();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw) =
                crate::model::kernels::cuda::training_ops::rms_norm_grads(x, w, g, self.eps)?;
            return Ok((Some(dx), want_w.then_some(dw)));
        }
        let (dx, dw) = with_f32(x, |x| {
            with_f32(w, |w| {
                with_f32(g, |g| {
                    let n = w.len();
                    let mut dx = vec![0f32; x.len()];
                    let mut dw = vec![0f32; if want_w { n } else { 0 }];
                    let rows = x.chunks_exact(n).zip(g.chunks_exact(n));
                    for ((xr, gr), dxr) in rows.zip(dx.chunks_exact_mut(n)) {
                        let r = inv_rms(xr, self.eps);
                        let mut s = 0f32;
                        for ((gi, wi), xi) in gr.iter().zip(w).zip(xr) {
                            s += gi * wi * xi;
                        }
                        let c = s * r * r * r / n as f32;
                        for (((d, gi), wi), xi) in dxr.iter_mut().zip(gr).zip(w).zip(xr) {
                            *d = r * gi * wi - c * xi;
                        }
                        if want_w {
                            for ((d, gi), xi) in dw.iter_mut().zip(gr).zip(xr) {
                                *d += gi * xi * r;
                            }
                        }
                    }
                    (dx, dw)
                })
            })
        })???;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = if want_w {
            Some(Tensor::from_vec(dw, w.shape(), w.device())?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// RMS norm of `x` (f32 on the CPU; f32 or bf16 on a GPU, with `--features cuda`) over its
/// last dimension, scaled by `w` (taken in `x`'s dtype).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    if w.dims() != [n] {
        candle_core::bail!("rms norm: weight {:?} for rows of {n}", w.shape());
    }
    x.contiguous()?.apply_op2(
        &w.to_dtype(x.dtype())?.contiguous()?,
        RmsNorm { eps: eps as f32 },
    )
}
