//! `silu(a) * b`, the gated MLP's activation, with its backward.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::{slice, with_f32};

struct Swiglu;

/// `e^x`, within 2e-7 relative of `f32::exp` over the range that matters to a sigmoid, and
/// without a call or a branch: the MLP takes ~2 M sigmoids a step, and libm's scalar `expf`
/// was a tenth of adaptation's time. Cody-Waite reduction `x = n ln2 + r`, `|r| <= ln2 / 2`,
/// then a degree-7 Taylor polynomial for `e^r` and `2^n` built in the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest by the float adder: 1.5 * 2^23.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    // SAFETY: the clamp keeps n in [-126, 127], where the cast is exact.
    let e = unsafe { n.to_int_unchecked::<i32>() };
    p * f32::from_bits(((e + 127) as u32) << 23)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
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
        let mut y = vec![0f32; a.len()];
        for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
            *y = a * sigmoid(*a) * b;
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
        crate::model::kernels::cuda::training_ops::swiglu_fwd(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // da = g b s (1 + a (1 - s)), db = g a s, with s = sigmoid(a).
        #[cfg(feature = "cuda")]
        if a.device().is_cuda() {
            let (da, db) = crate::model::kernels::cuda::training_ops::swiglu_grads(a, b, g)?;
            return Ok((Some(da), Some(db)));
        }
        let (da, db) = with_f32(a, |a| {
            with_f32(b, |b| {
                with_f32(g, |g| {
                    let (mut da, mut db) = (vec![0f32; a.len()], vec![0f32; a.len()]);
                    let out = da.iter_mut().zip(db.iter_mut());
                    for ((((da, db), a), b), g) in out.zip(a).zip(b).zip(g) {
                        let s = sigmoid(*a);
                        *da = g * b * s * (1.0 + a * (1.0 - s));
                        *db = g * a * s;
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

/// `silu(a) * b` elementwise; `a` and `b` of one shape, f32 on the CPU or (with
/// `--features cuda`) f32 or bf16 on a GPU.
pub fn swiglu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("swiglu: shapes {:?} and {:?}", a.shape(), b.shape());
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, Swiglu)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fast_exp_is_within_a_few_ulp_of_libm() {
        let mut worst = 0f32;
        for i in -86_900..=87_900 {
            let x = i as f32 / 1000.0 + 0.000_37;
            let (got, want) = (super::exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        // Past the clamp: finite, and a sigmoid of 0 or 1.
        assert!(super::exp(200.0).is_finite() && super::exp(-200.0) >= 0.0);
        assert!((0.0..1e-30).contains(&super::sigmoid(-200.0)));
        assert!((super::sigmoid(200.0) - 1.0).abs() < 1e-7);
    }
}
