//! `x W^T` for a weight that is not trained, with a backward pass that only returns the input's
//! gradient. candle's matmul backward always computes both sides' gradients, so during LoRA
//! adaptation it would compute (and allocate) a gradient for every frozen weight of the model:
//! most of the backward time and memory. No crate offers this, hence the custom op.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

struct FrozenMatmul {
    /// `(out, in)`, as stored in the model.
    w: Tensor,
}

impl FrozenMatmul {
    /// The body of every device's kernel: `x` (`(m, k)` rows) times `w^T`. `storage` picks the
    /// weight's storage of the device `S` belongs to.
    fn run<S: BackendStorage>(
        &self,
        x: &S,
        l: &Layout,
        storage: impl for<'a> Fn(&'a Storage) -> Option<&'a S>,
    ) -> Result<(S, Shape)> {
        if !l.is_contiguous() {
            candle_core::bail!("frozen-matmul: input must be contiguous");
        }
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let m = l.shape().elem_count() / k.max(1);
        let (out, inp) = self.w.dims2()?;
        if inp != k {
            candle_core::bail!("frozen-matmul: input has {k} features, weight expects {inp}");
        }
        let wt = self.w.t()?;
        let (ws, wl) = wt.storage_and_layout();
        let Some(w) = storage(&ws) else {
            candle_core::bail!("frozen-matmul: weight and input are on different devices");
        };
        let lhs = Layout::contiguous_with_offset((m, k), l.start_offset());
        let y = x.matmul(w, (1, m, out, k), &lhs, wl)?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = out;
        Ok((y, Shape::from(shape)))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(x, l, |s| match s {
            Storage::Cpu(w) => Some(w),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run(x, l, |s| match s {
            Storage::Cuda(w) => Some(w),
            _ => None,
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// `x W^T` where no gradient is wanted for `w` (`(out, in)`): the backward skips the weight's
/// gradient. On devices without the kernel (Metal) this is a plain matmul.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let kernel = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    if kernel && x.device().same_device(w.device()) && x.dtype() == w.dtype() {
        x.contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(FrozenMatmul {
                w: w.contiguous()?,
            })))
    } else {
        x.broadcast_matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    #[test]
    fn matches_matmul_forward_and_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (2, 4, 3), &dev)?)?;
        let y1 = frozen_matmul(x.as_tensor(), &w)?;
        let y2 = x.as_tensor().broadcast_matmul(&w.t()?)?;
        let d = (&y1 - &y2)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12);
        let g1 = y1.sqr()?.sum_all()?.backward()?;
        let g2 = y2.sqr()?.sum_all()?.backward()?;
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!((a - b)?.abs()?.max_all()?.to_scalar::<f64>()? < 1e-10);
        // The frozen weight gets no gradient at all.
        assert!(g1.get(&w).is_none());
        // Non-contiguous input (a transposed view) is handled.
        let xt = Tensor::randn(0f32, 1.0, (3, 4), &dev)?.t()?;
        let wf = w.to_dtype(DType::F32)?;
        let d = (frozen_matmul(&xt, &wf)? - xt.matmul(&wf.t()?)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5);
        Ok(())
    }
}
