//! Softmax over the last dimension as one op with a backward: `dx = y (g - sum(g y))`.
//! candle's fused `softmax_last_dim` has no backward and its composed `softmax` takes about
//! five ops forward and six back.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, D};

use super::slice;

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l)?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = vec![0f32; x.len()];
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let m = xr.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for (yi, &xi) in yr.iter_mut().zip(xr) {
                *yi = (xi - m).exp();
                sum += *yi;
            }
            let inv = 1.0 / sum;
            yr.iter_mut().for_each(|v| *v *= inv);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::model::kernels::cuda::training_ops::softmax_fwd(s, l)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let dx = y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?;
        Ok(Some(dx))
    }
}

/// `dx = y (g - sum(g y))` per row, from the output `y` and its gradient `g`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (slice(s1, l1)?, slice(s2, l2)?);
        let n = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        for ((yr, gr), dr) in y
            .chunks_exact(n)
            .zip(g.chunks_exact(n))
            .zip(dx.chunks_exact_mut(n))
        {
            let s: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
            for ((d, &yi), &gi) in dr.iter_mut().zip(yr).zip(gr) {
                *d = yi * (gi - s);
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::model::kernels::cuda::training_ops::softmax_bwd(s1, l1, s2, l2)
    }
}

/// Softmax of `x` (f32) over its last dimension, with a backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.dim(D::Minus1)?;
    x.contiguous()?.apply_op1(Softmax)
}
