//! Rotary embedding ("rotate half", the Hugging Face layout) as one op with a backward:
//! `y = x cos + rotate_half(x) sin`. Its gradient is the same rotation by the opposite angle,
//! `g cos - rotate_half(g) sin`, so the backward is this op with `sign = -1`. candle's fused
//! `rope` has no backward, and `rope_slow` composes about seven ops each way.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::slice;

struct Rope {
    /// +1 for the rotation, -1 for its inverse (the backward).
    sign: f32,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, cos, sin) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (_, _, t, d) = l1.shape().dims4()?;
        let half = d / 2;
        let mut y = vec![0f32; x.len()];
        for (row, (xr, yr)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let p = row % t;
            let (c, s) = (
                &cos[p * half..(p + 1) * half],
                &sin[p * half..(p + 1) * half],
            );
            for i in 0..half {
                let (a, b) = (xr[i], xr[i + half]);
                let si = self.sign * s[i];
                yr[i] = a * c[i] - b * si;
                yr[i + half] = b * c[i] + a * si;
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
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::model::kernels::cuda::training_ops::rope(s1, l1, s2, l2, s3, l3, self.sign)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let inverse = Rope { sign: -self.sign };
        let dx = g.contiguous()?.apply_op3_no_bwd(cos, sin, &inverse)?;
        Ok((Some(dx), None, None))
    }
}

/// `x` (`(batch, heads, t, head_dim)`, f32) rotated by the angles of positions `0..t`: `cos`
/// and `sin` are `(>= t, head_dim / 2)` tables (the rows past `t` unread). The tables get no
/// gradient.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let (ct, half) = cos.dims2()?;
    if d % 2 != 0 || half * 2 != d || ct < t || sin.dims() != cos.dims() {
        candle_core::bail!(
            "rope: x {:?} with tables {:?} / {:?}",
            x.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    let (cos, sin) = (
        cos.narrow(0, 0, t)?.contiguous()?,
        sin.narrow(0, 0, t)?.contiguous()?,
    );
    x.contiguous()?
        .apply_op3(&cos.detach(), &sin.detach(), Rope { sign: 1.0 })
}
