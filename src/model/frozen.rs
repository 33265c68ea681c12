//! `x W^T` for a weight that is not trained, with a backward pass that only returns the input's
//! gradient. candle's matmul backward always computes both sides' gradients, so during LoRA
//! adaptation it would compute (and allocate) a gradient for every frozen weight of the model:
//! most of the backward time and memory. No crate offers this, hence the custom op.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::skinny;

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
        if let Some(out) = skinny_fwd(x, l, &self.w)? {
            return Ok(out);
        }
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
        let rows = grad.elem_count() / grad.dim(candle_core::D::Minus1)?.max(1);
        if grad.device().is_cpu() && grad.dtype() == DType::F32 && skinny::fits(rows) {
            return Ok(Some(
                grad.contiguous()?
                    .apply_op1_no_bwd(&InputGrad { w: self.w.clone() })?,
            ));
        }
        Ok(Some(grad.broadcast_matmul(&self.w)?))
    }
}

/// The f32 weight's elements, when it lies contiguous in CPU memory.
fn cpu_f32<R>(w: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    let (storage, layout) = w.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(&v[a..b])),
        _ => None,
    }
}

/// The forward product through [`skinny`] when the input has few rows; `None` to use gemm.
fn skinny_fwd(x: &CpuStorage, l: &Layout, w: &Tensor) -> Result<Option<(CpuStorage, Shape)>> {
    let (CpuStorage::F32(xv), Some((a, b))) = (x, l.contiguous_offsets()) else {
        return Ok(None);
    };
    let dims = l.shape().dims();
    let k = *dims.last().unwrap_or(&0);
    let (n, inp) = w.dims2()?;
    let m = (b - a) / k.max(1);
    if k == 0 || inp != k || !skinny::fits(m) {
        return Ok(None);
    }
    let Some(y) = cpu_f32(w, |wv| skinny::x_wt(&xv[a..b], wv, m, k, n)) else {
        return Ok(None);
    };
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    Ok(Some((CpuStorage::F32(y), Shape::from(shape))))
}

/// `grad W` on the CPU for a few rows of f32 gradient: the input's gradient of [`FrozenMatmul`].
struct InputGrad {
    w: Tensor,
}

impl CustomOp1 for InputGrad {
    fn name(&self) -> &'static str {
        "frozen-matmul-input-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(gv), Some((a, b))) = (g, l.contiguous_offsets()) else {
            candle_core::bail!("frozen-matmul-input-grad: needs a contiguous f32 gradient");
        };
        let dims = l.shape().dims();
        let n = *dims.last().unwrap_or(&0);
        let (wn, k) = self.w.dims2()?;
        let m = (b - a) / n.max(1);
        if n == 0 || wn != n || !skinny::fits(m) {
            candle_core::bail!(
                "frozen-matmul-input-grad: bad shape {dims:?} for weight ({wn}, {k})"
            );
        }
        let dx = cpu_f32(&self.w, |wv| skinny::g_w(&gv[a..b], wv, m, n, k)).ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul-input-grad: weight is not f32 on the CPU".into())
        })?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = k;
        Ok((CpuStorage::F32(dx), Shape::from(shape)))
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

    #[test]
    fn few_f32_rows_take_the_skinny_kernels_and_agree_with_f64_matmul() -> Result<()> {
        let dev = Device::Cpu;
        // 2 * 3 = 6 rows: within skinny::MAX_ROWS; widths off the kernels' lane multiples.
        let w64 = Tensor::randn(0f64, 1.0, (70, 40), &dev)?;
        let x64 = Tensor::randn(0f64, 1.0, (2, 3, 40), &dev)?;
        let x = Var::from_tensor(&x64.to_dtype(DType::F32)?)?;
        let w = w64.to_dtype(DType::F32)?;
        let y = frozen_matmul(x.as_tensor(), &w)?;
        let want = x64.broadcast_matmul(&w64.t()?)?;
        let gap = |a: &Tensor, b: &Tensor| -> Result<f64> {
            (a.to_dtype(DType::F64)? - b)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()
        };
        assert!(gap(&y, &want)? < 1e-3);
        let g = y.sqr()?.sum_all()?.backward()?;
        let want_g = (want * 2.0)?.broadcast_matmul(&w64)?;
        assert!(gap(g.get(x.as_tensor()).unwrap(), &want_g)? < 1e-2);
        Ok(())
    }
}
