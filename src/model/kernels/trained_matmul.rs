//! `x W^T` for a weight being trained (full-scope adaptation) with few rows of input: the
//! product and both gradients take the few-row kernels of [`super::few_rows`]. candle's matmul
//! would pack the transposed weight for each of the three products and route the weight's
//! gradient through a broadcast and two transposes; at ~20 rows that was most of the backward.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::few_rows::{self, Weight};
use crate::model::WeightGrads;

struct TrainedMatmul {
    /// Where the weight's gradient goes; without one it is returned to candle.
    sink: Option<Arc<WeightGrads>>,
}

/// `t`'s elements when it is a contiguous f32 CPU tensor.
fn f32s<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let mut f = Some(f);
    Weight::of(t, |v| match v {
        Weight::F32(v) => f.take().map(|f| f(v)),
        Weight::Bf16(_) => None,
    })
    .flatten()
    .ok_or_else(|| {
        candle_core::Error::Msg("trained-matmul: needs contiguous f32 CPU tensors".into())
    })
}

impl CustomOp2 for TrainedMatmul {
    fn name(&self) -> &'static str {
        "trained-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(xv), Some((xa, xb)), CpuStorage::F32(wv), Some((wa, wb))) =
            (x, xl.contiguous_offsets(), w, wl.contiguous_offsets())
        else {
            candle_core::bail!("trained-matmul: needs contiguous f32 operands");
        };
        let dims = xl.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let (n, wk) = wl.shape().dims2()?;
        let m = (xb - xa) / k.max(1);
        if k == 0 || wk != k || !few_rows::fits(m) {
            candle_core::bail!("trained-matmul: {dims:?} by weight ({n}, {wk})");
        }
        let y = few_rows::x_wt(&xv[xa..xb], &wv[wa..wb], m, k, n);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k) = w.dims2()?;
        let m = x.elem_count() / k.max(1);
        let grad = grad.contiguous()?;
        let (dx, dw) = f32s(&grad, |g| {
            let dx = f32s(w, |w| few_rows::g_w(g, w, m, n, k))?;
            let dw = f32s(x, |x| match &self.sink {
                Some(sink) => sink.add_outer(w, g, x, m).map(|()| None),
                None => Ok(Some(few_rows::gt_x(g, x, m, n, k))),
            })??;
            Ok::<_, candle_core::Error>((dx, dw))
        })??;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            dw.map(|dw| Tensor::from_vec(dw, (n, k), w.device()))
                .transpose()?,
        ))
    }
}

/// `x W^T` for `w` `(out, in)` with gradients for both; few-row f32 CPU inputs take the
/// kernels, anything else candle's matmul. With `sink`, the kernels' weight gradient goes
/// there instead of to candle.
pub fn trained_matmul(x: &Tensor, w: &Tensor, sink: Option<&Arc<WeightGrads>>) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let m = x.elem_count() / k.max(1);
    let cpu = x.device().is_cpu() && w.device().is_cpu();
    if cpu && x.dtype() == DType::F32 && w.dtype() == DType::F32 && few_rows::fits(m) {
        x.contiguous()?.apply_op2_arc(
            &w.contiguous()?,
            Arc::new(Box::new(TrainedMatmul {
                sink: sink.cloned(),
            })),
        )
    } else {
        x.broadcast_matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn both_gradients_match_candles_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 40), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (67, 40), &dev)?)?;
        let ours = trained_matmul(x.as_tensor(), w.as_tensor(), None)?;
        let plain = x.as_tensor().broadcast_matmul(&w.as_tensor().t()?)?;
        let gap = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(gap(&ours, &plain)? < 1e-4);
        let g1 = ours.sqr()?.sum_all()?.backward()?;
        let g2 = plain.sqr()?.sum_all()?.backward()?;
        for v in [&x, &w] {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(a.dims(), b.dims());
            assert!(gap(a, b)? < 1e-3, "{:?}", a.dims());
        }
        Ok(())
    }
}
