//! Adaptation's RMS norm, `silu(a) * b`, rotary embedding and softmax on the GPU
//! (`training_ops.cu`): the CUDA bodies of the ops in `model/kernels/fused/`, forward and
//! backward, one launch each. A backward with two gradients returns them in one `(2, ..)`
//! buffer.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{contiguous_view, TRAINING_OPS};

/// What the errors of these ops name.
const WHAT: &str = "CUDA training op";

const THREADS: u32 = 256;

fn launch_cfg(blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks for an elementwise pass over `len` elements (grid-stride beyond).
fn elementwise_blocks(len: usize) -> usize {
    len.div_ceil(THREADS as usize).min(65_535)
}

/// `x / rms(x) * w` over rows of `w.len()`, f32 or bf16 (`w` of `x`'s dtype; f32 arithmetic).
pub fn rms_norm_fwd(
    x: &CudaStorage,
    lx: &Layout,
    w: &CudaStorage,
    lw: &Layout,
    eps: f32,
) -> Result<(CudaStorage, Shape)> {
    let y = match x.dtype() {
        DType::F32 => rms_norm_fwd_in::<f32>(x, lx, w, lw, eps, "rms_norm_fwd")?,
        DType::BF16 => rms_norm_fwd_in::<half::bf16>(x, lx, w, lw, eps, "rms_norm_fwd_bf16")?,
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
    name: &str,
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
    let f = dev.get_or_load_custom_func(name, TRAINING_OPS.0, TRAINING_OPS.1)?;
    let mut b = f.builder();
    let (n32, eps) = (n as i32, eps);
    b.arg(&xv).arg(&wv).arg(&mut y).arg(&n32).arg(&eps);
    if len > 0 && n > 0 {
        // SAFETY: one block per row of `n` contiguous elements, as the kernel reads them.
        unsafe { b.launch(launch_cfg(len / n)) }.map_err(candle_core::Error::wrap)?;
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
            DType::F32 => self.launch::<f32>(x, lx, w, lw, g, lg, "rms_norm_bwd")?,
            DType::BF16 => self.launch::<half::bf16>(x, lx, w, lw, g, lg, "rms_norm_bwd_bf16")?,
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
        name: &str,
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
        let f = dev.get_or_load_custom_func(name, TRAINING_OPS.0, TRAINING_OPS.1)?;
        let mut b = f.builder();
        let (n32, eps) = (n as i32, self.eps);
        b.arg(&xv)
            .arg(&wv)
            .arg(&gv)
            .arg(&mut out)
            .arg(&rows)
            .arg(&n32)
            .arg(&eps);
        if rows > 0 {
            // SAFETY: one block per row; `out` holds `2 * len` f32.
            unsafe { b.launch(launch_cfg(rows as usize)) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

/// One elementwise launch of `name_{f32,bf16}` over `len` elements of `inputs` (contiguous,
/// one dtype), writing `outputs * len` elements.
fn elementwise(
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    outputs: usize,
    len: usize,
) -> Result<CudaStorage> {
    fn run<T: CudaDType + DeviceRepr>(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        outputs: usize,
        len: usize,
    ) -> Result<CudaStorage> {
        let dev = &inputs[0].0.device;
        let views = inputs
            .iter()
            .map(|(s, l)| contiguous_view::<T>(s, l, WHAT))
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(outputs * len) }?;
        let f = dev.get_or_load_custom_func(name, TRAINING_OPS.0, TRAINING_OPS.1)?;
        let mut bl = f.builder();
        for v in &views {
            bl.arg(v);
        }
        let n = len as i64;
        bl.arg(&mut out).arg(&n);
        // SAFETY: a grid-stride loop over `len` elements of each input and output.
        unsafe { bl.launch(launch_cfg(elementwise_blocks(len))) }
            .map_err(candle_core::Error::wrap)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
    let dtype = inputs[0].0.dtype();
    if inputs.iter().any(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!("CUDA {name}: operands of one dtype");
    }
    match dtype {
        DType::F32 => run::<f32>(&format!("{name}_f32"), inputs, outputs, len),
        DType::BF16 => run::<half::bf16>(&format!("{name}_bf16"), inputs, outputs, len),
        d => candle_core::bail!("CUDA {name}: {d:?} operands"),
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
    let y = elementwise("swiglu_fwd", &[(a, la), (b, lb)], 1, len)?;
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
        let storage = elementwise("swiglu_bwd", &[(a, la), (b, lb), (g, lg)], 2, len)?;
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
    let f = dev.get_or_load_custom_func("rope_f32", TRAINING_OPS.0, TRAINING_OPS.1)?;
    let mut bl = f.builder();
    let (t32, d32) = (t as i32, d as i32);
    bl.arg(&xv)
        .arg(&cv)
        .arg(&sv)
        .arg(&mut y)
        .arg(&rows)
        .arg(&t32)
        .arg(&d32)
        .arg(&sign);
    if len > 0 {
        // SAFETY: a grid-stride loop over the `rows * d / 2` pairs of contiguous buffers.
        unsafe { bl.launch(launch_cfg(elementwise_blocks(len / 2))) }
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
    let f = dev.get_or_load_custom_func("softmax_fwd_f32", TRAINING_OPS.0, TRAINING_OPS.1)?;
    let mut bl = f.builder();
    let n32 = n as i32;
    bl.arg(&xv).arg(&mut y).arg(&n32);
    if len > 0 && n > 0 {
        // SAFETY: one block per row of `n` contiguous f32.
        unsafe { bl.launch(launch_cfg(len / n)) }.map_err(candle_core::Error::wrap)?;
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
    let f = dev.get_or_load_custom_func("softmax_bwd_f32", TRAINING_OPS.0, TRAINING_OPS.1)?;
    let mut bl = f.builder();
    let n32 = n as i32;
    bl.arg(&yv).arg(&gv).arg(&mut dx).arg(&n32);
    if len > 0 && n > 0 {
        // SAFETY: one block per row of `n` contiguous f32.
        unsafe { bl.launch(launch_cfg(len / n)) }.map_err(candle_core::Error::wrap)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(dx, dev.clone()),
        ly.shape().clone(),
    ))
}
