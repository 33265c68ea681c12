//! Adaptation's RMS norm, `silu(a) * b`, rotary embedding and softmax on the GPU
//! (`training_ops.cu`): the CUDA bodies of the ops in `model/kernels/fused/`, forward and
//! backward, one launch each. A backward with two gradients returns them in one `(2, ..)`
//! buffer.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::{abi, contiguous_view, function};

/// What the errors of these ops name.
const WHAT: &str = "CUDA training op";

/// `x / rms(x) * w` over rows of `w.len()`, f32 or bf16 (`w` of `x`'s dtype; f32 arithmetic).
pub fn rms_norm_fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let y = match x.dtype() {
        DType::F32 => rms_norm_fwd_in::<f32>(x, lx, w, lw, eps)?,
        DType::BF16 => rms_norm_fwd_in::<half::bf16>(x, lx, w, lw, eps)?,
        d => candle_core::bail!("{WHAT}: {d:?} rms norm"),
    };
    Ok((y, lx.shape().clone()))
}

fn rms_norm_fwd_in<T: CudaDType + DeviceRepr>(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let n = lw.shape().elem_count();
    let len = lx.shape().elem_count();
    let (xv, wv) = (
        contiguous_view::<T>(x, lx, WHAT)?,
        contiguous_view::<T>(w, lw, WHAT)?,
    );
    // SAFETY: every element is written by the kernel before the buffer is read.
    let mut y = unsafe { dev.alloc::<T>(len) }?;
    let f = function(dev, &abi::rms_norm_fwd::DECL, x.dtype())?;
    let mut b = f.builder();
    let n32 = n as i32;
    abi::rms_norm_fwd::push(&mut b, &xv, &wv, &mut y, &n32, &eps);
    if len > 0 && n > 0 {
        // SAFETY: one block per row of `n` contiguous elements, as the kernel reads them.
        unsafe { b.launch(abi::grid::ops_rows(len / n).into()) }
            .map_err(candle_core::Error::wrap)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The gradients of `rms_norm(x, w)` for the output gradient `g`: `(dx, dw)`, in `x`'s and
/// `w`'s dtypes (computed and summed in f32).
pub fn rms_norm_grads(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let both = x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &g.to_dtype(x.dtype())?.contiguous()?,
        &RmsNormGrads { eps },
    )?;
    let dw = both.get(1)?.sum(0)?.to_dtype(w.dtype())?;
    Ok((both.get(0)?.reshape(x.shape())?.to_dtype(x.dtype())?, dw))
}

struct RmsNormGrads {
    eps: f32,
}

impl CustomOp3 for RmsNormGrads {
    fn name(&self) -> &'static str {
        "cuda-rms-norm-grads"
    }

    super::cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => self.launch::<f32>(x, lx, w, lw, g, lg)?,
            DType::BF16 => self.launch::<half::bf16>(x, lx, w, lw, g, lg)?,
            d => candle_core::bail!("{WHAT}: {d:?} rms norm gradients"),
        };
        let n = lw.shape().elem_count();
        let rows = lx.shape().elem_count() / n.max(1);
        Ok((out, Shape::from((2, rows, n))))
    }
}

impl RmsNormGrads {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        w: &CudaStorage,
        lw: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let n = lw.shape().elem_count();
        let len = lx.shape().elem_count();
        let rows = (len / n.max(1)) as i64;
        let (xv, wv, gv) = (
            contiguous_view::<T>(x, lx, WHAT)?,
            contiguous_view::<T>(w, lw, WHAT)?,
            contiguous_view::<T>(g, lg, WHAT)?,
        );
        // SAFETY: the kernel writes both halves in full.
        let mut out = unsafe { dev.alloc::<f32>(2 * len) }?;
        let f = function(dev, &abi::rms_norm_bwd::DECL, x.dtype())?;
        let mut b = f.builder();
        let n32 = n as i32;
        abi::rms_norm_bwd::push(&mut b, &xv, &wv, &gv, &mut out, &rows, &n32, &self.eps);
        if rows > 0 {
            // SAFETY: one block per row; `out` holds `2 * len` f32.
            unsafe { b.launch(abi::grid::ops_rows(rows as usize).into()) }
                .map_err(candle_core::Error::wrap)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// SwiGLU's two elementwise kernels.
#[derive(Clone, Copy)]
enum Elementwise {
    /// `(a, b)` in, `y` out.
    Fwd,
    /// `(a, b, g)` in, `(da, db)` out.
    Bwd,
}

/// One elementwise launch of `kernel` over `len` elements of `inputs` (contiguous, one dtype),
/// writing `len` elements per output.
fn elementwise(
    kernel: Elementwise,
    inputs: &[(&CudaStorage, &Layout)],
    len: usize,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        kernel: Elementwise,
        inputs: &[(&CudaStorage, &Layout)],
        len: usize,
    ) -> Result<CudaStorage> {
        let dev = &inputs[0].0.device;
        let v = inputs
            .iter()
            .map(|(s, l)| contiguous_view::<T>(s, l, WHAT))
            .collect::<Result<Vec<_>>>()?;
        let n = len as i64;
        let (decl, outputs) = match kernel {
            Elementwise::Fwd => (abi::swiglu_fwd::DECL, 1),
            Elementwise::Bwd => (abi::swiglu_bwd::DECL, 2),
        };
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(outputs * len) }?;
        let f = function(dev, &decl, T::DTYPE)?;
        let mut bl = f.builder();
        match kernel {
            Elementwise::Fwd => abi::swiglu_fwd::push(&mut bl, &v[0], &v[1], &mut out, &n),
            Elementwise::Bwd => abi::swiglu_bwd::push(&mut bl, &v[0], &v[1], &v[2], &mut out, &n),
        }
        // SAFETY: a grid-stride loop over `len` elements of each input and output.
        unsafe { bl.launch(abi::grid::ops_elementwise(len).into()) }
            .map_err(candle_core::Error::wrap)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("{WHAT}: SwiGLU operands of one dtype");
    }
    match dtype {
        DType::F32 => run::<f32>(kernel, inputs, len),
        DType::BF16 => run::<half::bf16>(kernel, inputs, len),
        d => candle_core::bail!("{WHAT}: {d:?} SwiGLU operands"),
    }
}

/// `silu(a) * b`, f32 or bf16.
pub fn swiglu_fwd(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let len = la.shape().elem_count();
    let y = elementwise(Elementwise::Fwd, &[(a, la), (b, lb)], len)?;
    Ok((y, la.shape().clone()))
}

/// The gradients of `silu(a) * b` for the output gradient `g`: `(da, db)`.
pub fn swiglu_grads(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let g = g.to_dtype(a.dtype())?.contiguous()?;
    let both = a
        .contiguous()?
        .apply_op3_no_bwd(&b.contiguous()?, &g, &SwigluGrads)?;
    Ok((both.get(0)?, both.get(1)?))
}

struct SwigluGrads;

impl CustomOp3 for SwigluGrads {
    fn name(&self) -> &'static str {
        "cuda-swiglu-grads"
    }

    super::cuda_only!(3);

    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        la: &Layout,
        b: &CudaStorage,
        lb: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let len = la.shape().elem_count();
        let mut dims = vec![2];
        dims.extend_from_slice(la.dims());
        let storage = elementwise(Elementwise::Bwd, &[(a, la), (b, lb), (g, lg)], len)?;
        Ok((storage, Shape::from(dims)))
    }
}

/// `x` (`(b, h, t, d)`, f32) rotated by `cos`/`sin` (`(t, d / 2)`), by `sign` times the angle.
pub fn rope(
    x: &CudaStorage,
    lx: &Layout,
    cos: &CudaStorage,
    lc: &Layout,
    sin: &CudaStorage,
    ls: &Layout,
    sign: f32,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (b, h, t, d) = lx.shape().dims4()?;
    let rows = (b * h * t) as i64;
    let len = lx.shape().elem_count();
    let (xv, cv, sv) = (
        contiguous_view::<f32>(x, lx, WHAT)?,
        contiguous_view::<f32>(cos, lc, WHAT)?,
        contiguous_view::<f32>(sin, ls, WHAT)?,
    );
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<f32>(len) }?;
    let f = function(dev, &abi::rope::DECL, DType::F32)?;
    let mut bl = f.builder();
    let (t32, d32) = (t as i32, d as i32);
    abi::rope::push(&mut bl, &xv, &cv, &sv, &mut y, &rows, &t32, &d32, &sign);
    if len > 0 {
        // SAFETY: a grid-stride loop over the `rows * d / 2` pairs of contiguous buffers.
        unsafe { bl.launch(abi::grid::ops_elementwise(len / 2).into()) }
            .map_err(candle_core::Error::wrap)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        lx.shape().clone(),
    ))
}

/// Softmax of `x` (f32) over its last dimension.
pub fn softmax_fwd(x: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let n = l.shape().dims().last().copied().unwrap_or(1);
    let len = l.shape().elem_count();
    let xv = contiguous_view::<f32>(x, l, WHAT)?;
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<f32>(len) }?;
    let f = function(dev, &abi::softmax_fwd::DECL, DType::F32)?;
    let mut bl = f.builder();
    let n32 = n as i32;
    abi::softmax_fwd::push(&mut bl, &xv, &mut y, &n32);
    if len > 0 && n > 0 {
        // SAFETY: one block per row of `n` contiguous f32.
        unsafe { bl.launch(abi::grid::ops_rows(len / n).into()) }
            .map_err(candle_core::Error::wrap)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        l.shape().clone(),
    ))
}

/// `dx = y (g - sum(g y))` per row of the last dimension (f32).
pub fn softmax_bwd(
    y: &CudaStorage,
    ly: &Layout,
    g: &CudaStorage,
    lg: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = &y.device;
    let n = ly.shape().dims().last().copied().unwrap_or(1);
    let len = ly.shape().elem_count();
    let (yv, gv) = (
        contiguous_view::<f32>(y, ly, WHAT)?,
        contiguous_view::<f32>(g, lg, WHAT)?,
    );
    // SAFETY: the kernel writes every element.
    let mut dx = unsafe { dev.alloc::<f32>(len) }?;
    let f = function(dev, &abi::softmax_bwd::DECL, DType::F32)?;
    let mut bl = f.builder();
    let n32 = n as i32;
    abi::softmax_bwd::push(&mut bl, &yv, &gv, &mut dx, &n32);
    if len > 0 && n > 0 {
        // SAFETY: one block per row of `n` contiguous f32.
        unsafe { bl.launch(abi::grid::ops_rows(len / n).into()) }
            .map_err(candle_core::Error::wrap)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dx, dev.clone()),
        ly.shape().clone(),
    ))
}
