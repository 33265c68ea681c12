//! `x W^T` for a weight that is not trained, with a backward pass that only returns the input's
//! gradient. candle's matmul backward always computes both sides' gradients, so during LoRA
//! adaptation it would compute (and allocate) a gradient for every frozen weight of the model:
//! most of the backward time and memory. No crate offers this, hence the custom op.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

use super::few_rows::{self, Weight};

struct FrozenMatmul {
    /// `(out, in)`, as stored in the model.
    w: Tensor,
    /// The same weight in bf16, when few-row products may use it.
    wb: Option<Tensor>,
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
        if let Some(out) = few_rows_fwd(x, l, &self.w, self.wb.as_ref())? {
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
        Ok(Some(frozen_input_grad(grad, &self.w, self.wb.as_ref())?))
    }
}

/// `grad W` for `grad` `(.., out)` and `w` `(out, in)`: the input's gradient of
/// [`frozen_matmul_bf16`]`(x, w, wb)`, computed on its own (where a backward needs the gradient
/// a product passes to its input but not the product itself).
pub fn frozen_input_grad(grad: &Tensor, w: &Tensor, wb: Option<&Tensor>) -> Result<Tensor> {
    let rows = grad.elem_count() / grad.dim(candle_core::D::Minus1)?.max(1);
    if grad.device().is_cpu() && grad.dtype() == DType::F32 {
        if let Some(w) = few_rows::pick(w, wb, rows) {
            return grad
                .contiguous()?
                .apply_op1_no_bwd(&InputGrad { w: w.clone() });
        }
    }
    grad.broadcast_matmul(w)
}

/// The forward product through [`few_rows`] when the input has few rows; `None` to use gemm.
fn few_rows_fwd(
    x: &CpuStorage,
    l: &Layout,
    w: &Tensor,
    wb: Option<&Tensor>,
) -> Result<Option<(CpuStorage, Shape)>> {
    let (CpuStorage::F32(xv), Some((a, b))) = (x, l.contiguous_offsets()) else {
        return Ok(None);
    };
    let dims = l.shape().dims();
    let k = *dims.last().unwrap_or(&0);
    let (n, inp) = w.dims2()?;
    let m = (b - a) / k.max(1);
    if k == 0 || inp != k {
        return Ok(None);
    }
    let Some(w) = few_rows::pick(w, wb, m) else {
        return Ok(None);
    };
    let Some(y) = Weight::of(w, |w| w.x_wt(&xv[a..b], m, k, n)) else {
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
        let dx = Weight::of(&self.w, |w| {
            (n > 0 && wn == n && w.fits(m)).then(|| w.g_w(&gv[a..b], m, n, k))
        })
        .flatten()
        .ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "frozen-matmul-input-grad: {dims:?} by weight ({wn}, {k}) off the kernels"
            ))
        })?;
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = k;
        Ok((CpuStorage::F32(dx), Shape::from(shape)))
    }
}

/// `x W^T` where no gradient is wanted for `w` (`(out, in)`): the backward skips the weight's
/// gradient. On devices without the kernel (Metal) this is a plain matmul.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    frozen_matmul_bf16(x, w, None)
}

/// [`frozen_matmul`], where `wb`, the same weight in bf16, may serve few-row f32 products on
/// CPUs with native bf16 dot products (f32 sums).
pub fn frozen_matmul_bf16(x: &Tensor, w: &Tensor, wb: Option<&Tensor>) -> Result<Tensor> {
    let kernel = x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda());
    if kernel && x.device().same_device(w.device()) && x.dtype() == w.dtype() {
        x.contiguous()?
            .apply_op1_arc(std::sync::Arc::new(Box::new(FrozenMatmul {
                w: w.contiguous()?,
                wb: wb.filter(|_| x.device().is_cpu()).cloned(),
            })))
    } else {
        x.broadcast_matmul(&w.t()?)
    }
}

/// A bf16 copy of a frozen f32 CPU weight, made on first use (by adaptation) and kept; none
/// where the CPU lacks native bf16 dot products.
#[derive(Default)]
pub struct Bf16Weight(std::sync::OnceLock<Option<Tensor>>);

impl Bf16Weight {
    pub fn get(&self, w: &Tensor) -> Option<&Tensor> {
        self.0
            .get_or_init(|| {
                let eligible =
                    w.device().is_cpu() && w.dtype() == DType::F32 && few_rows::fits_bf16(1);
                eligible.then(|| w.to_dtype(DType::BF16).ok()).flatten()
            })
            .as_ref()
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
    fn few_f32_rows_take_the_few_row_kernels_and_agree_with_f64_matmul() -> Result<()> {
        let dev = Device::Cpu;
        // 2 * 3 = 6 rows: within few_rows::MAX_ROWS; widths off the kernels' lane multiples.
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

    #[test]
    fn a_bf16_copy_serves_few_rows_within_bf16_precision() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 40), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 40), &dev)?)?;
        let copy = Bf16Weight::default();
        let Some(wb) = copy.get(&w) else {
            // No AVX-512 BF16 here: no copy is made and callers keep f32.
            assert!(!few_rows::fits_bf16(1));
            return Ok(());
        };
        assert_eq!(wb.dtype(), DType::BF16);
        let y16 = frozen_matmul_bf16(x.as_tensor(), &w, Some(wb))?;
        let y32 = frozen_matmul(x.as_tensor(), &w)?;
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            Ok(d / b.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        // Rounded operands: close to f32, but not bit-equal (the bf16 path ran).
        let r = rel(&y16, &y32)?;
        assert!(r > 0.0 && r < 2e-2, "forward: {r}");
        let g16 = y16.sqr()?.sum_all()?.backward()?;
        let g32 = y32.sqr()?.sum_all()?.backward()?;
        let (a, b) = (
            g16.get(x.as_tensor()).unwrap(),
            g32.get(x.as_tensor()).unwrap(),
        );
        let r = rel(a, b)?;
        assert!(r > 0.0 && r < 3e-2, "input gradient: {r}");
        Ok(())
    }
}
