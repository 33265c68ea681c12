//! `silu(a) * b`, the gated MLP's activation, with its backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{slice, with_f32};

struct Swiglu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (slice(s1, l1)?, slice(s2, l2)?);
        let y = a.iter().zip(b).map(|(a, b)| a * sigmoid(*a) * b).collect();
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // da = g b s (1 + a (1 - s)), db = g a s, with s = sigmoid(a).
        let (da, db) = with_f32(a, |a| {
            with_f32(b, |b| {
                with_f32(g, |g| {
                    let mut da = Vec::with_capacity(a.len());
                    let mut db = Vec::with_capacity(a.len());
                    for ((a, b), g) in a.iter().zip(b).zip(g) {
                        let s = sigmoid(*a);
                        da.push(g * b * s * (1.0 + a * (1.0 - s)));
                        db.push(g * a * s);
                    }
                    (da, db)
                })
            })
        })???;
        Ok((
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

/// `silu(a) * b` elementwise; `a` and `b` f32 on the CPU, of one shape.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("swiglu: shapes {:?} and {:?}", a.shape(), b.shape());
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Swiglu)
}
