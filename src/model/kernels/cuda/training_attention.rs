//! Adaptation's causal self-attention with rotary embedding on the GPU
//! (`training_attention.cu`): the CUDA body of `fused::causal_attention`, forward in two
//! launches and backward in three, for f32 or bf16 operands (f32 arithmetic). Its CPU body is the reference; `ttarag bench
//! --kernels` compares this one with candle's composed attention on the GPU. It runs where
//! `[model] cuda_fused_training` sends adaptation's blocks through the fused path.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{
    CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};

use super::{abi, contiguous_view, function, held_view};

pub use super::abi::grid::AttentionDims;

/// `x` (b, t, heads * d) rotated by each position's angles into a new f32 (b, heads, t, d).
fn rotate<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    x: &CudaView<'_, T>,
    tables: (&CudaView<'_, f32>, &CudaView<'_, f32>),
    dims: AttentionDims,
    heads: usize,
) -> Result<CudaSlice<f32>> {
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<f32>(dims.b * heads * dims.t * dims.d) }?;
    let f = function(dev, &abi::attn_rotate::DECL, T::DTYPE)?;
    let mut bl = f.builder();
    let (t, _, _, d) = dims.i32s();
    let h32 = heads as i32;
    abi::attn_rotate::push(&mut bl, x, tables.0, tables.1, &mut out, &t, &h32, &d);
    let cfg = abi::grid::attn_rotate(&dims, heads).into();
    // SAFETY: block (head, position, sequence) reads its row of the contiguous input and its
    // position's angles, and writes that row of the output.
    unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
    Ok(out)
}

/// The forward pass: `q`, `k`, `v` contiguous f32 or bf16 as `fused::causal_attention` takes
/// them; `cos`, `sin` the `(>= t, d / 2)` tables (contiguous f32 on the device). Returns the
/// heads' values, `(b, t, heads * d)`, in the operands' dtype.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    dims: AttentionDims,
) -> Result<(CudaStorage, Shape)> {
    let y = match q.dtype() {
        DType::F32 => forward_in::<f32>(q, lq, k, lk, v, lv, cos, sin, dims)?,
        DType::BF16 => forward_in::<half::bf16>(q, lq, k, lk, v, lv, cos, sin, dims)?,
        d => candle_core::bail!("training attention: {d:?} operands"),
    };
    Ok((y, lq.shape().clone()))
}

#[allow(clippy::too_many_arguments)]
fn forward_in<T: CudaDType + DeviceRepr + WithDType>(
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    lk: &Layout,
    v: &CudaStorage,
    lv: &Layout,
    cos: &Tensor,
    sin: &Tensor,
    dims: AttentionDims,
) -> Result<CudaStorage> {
    const WHAT: &str = "training attention";
    let dev = &q.device;
    let (qv, kv, vv) = (
        contiguous_view::<T>(q, lq, WHAT)?,
        contiguous_view::<T>(k, lk, WHAT)?,
        contiguous_view::<T>(v, lv, WHAT)?,
    );
    let ((cs, cl), (ss, sl)) = (cos.storage_and_layout(), sin.storage_and_layout());
    let cv = held_view::<f32>(&cs, cl, WHAT)?;
    let sv = held_view::<f32>(&ss, sl, WHAT)?;
    let qr = rotate(dev, &qv, (&cv, &sv), dims, dims.heads)?;
    let kr = rotate(dev, &kv, (&cv, &sv), dims, dims.kv)?;
    // SAFETY: the kernel writes every element.
    let mut y = unsafe { dev.alloc::<T>(lq.shape().elem_count()) }?;
    let f = function(dev, &abi::attn_fwd::DECL, T::DTYPE)?;
    let mut bl = f.builder();
    let (t, h, kvh, d) = dims.i32s();
    let scale = dims.scale();
    abi::attn_fwd::push(&mut bl, &qr, &kr, &vv, &mut y, &t, &h, &kvh, &d, &scale);
    // SAFETY: warp (head, sequence, row) reads its rotated query, the rotated keys and the
    // values of its KV head up to its row, and writes its row of y; shared memory holds each
    // warp's query and scores.
    unsafe { bl.launch(abi::grid::attn_fwd(&dims).into()) }.map_err(candle_core::Error::wrap)?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

/// The gradients of `q`, `k`, `v` for the output gradient `dy`.
pub fn grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dy: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    dims: AttentionDims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (nq, nk) = (q.elem_count(), k.elem_count());
    let all = q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &Grads {
            dy: dy.to_dtype(q.dtype())?.contiguous()?,
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
            dims,
        },
    )?;
    Ok((
        all.narrow(0, 0, nq)?.reshape(q.shape())?,
        all.narrow(0, nq, nk)?.reshape(k.shape())?,
        all.narrow(0, nq + nk, nk)?.reshape(v.shape())?,
    ))
}

/// The backward pass as one op over (q, k, v): its output is dq, dk and dv end to end.
struct Grads {
    dy: Tensor,
    cos: Tensor,
    sin: Tensor,
    dims: AttentionDims,
}

impl CustomOp3 for Grads {
    fn name(&self) -> &'static str {
        "cuda-training-attention-grads"
    }

    super::cuda_only!(3);

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = match q.dtype() {
            DType::F32 => self.launch::<f32>(q, lq, k, lk, v, lv)?,
            DType::BF16 => self.launch::<half::bf16>(q, lq, k, lk, v, lv)?,
            d => candle_core::bail!("training attention grads: {d:?} operands"),
        };
        let len = lq.shape().elem_count() + 2 * lk.shape().elem_count();
        Ok((out, Shape::from(len)))
    }
}

impl Grads {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<CudaStorage> {
        const WHAT: &str = "training attention grads";
        let dev = &q.device;
        let dims = self.dims;
        let (qv, kv, vv) = (
            contiguous_view::<T>(q, lq, WHAT)?,
            contiguous_view::<T>(k, lk, WHAT)?,
            contiguous_view::<T>(v, lv, WHAT)?,
        );
        let (gs, gl) = self.dy.storage_and_layout();
        let gv = held_view::<T>(&gs, gl, WHAT)?;
        let ((cs, cl), (ss, sl)) = (self.cos.storage_and_layout(), self.sin.storage_and_layout());
        let cv = held_view::<f32>(&cs, cl, WHAT)?;
        let sv = held_view::<f32>(&ss, sl, WHAT)?;
        let qr = rotate(dev, &qv, (&cv, &sv), dims, dims.heads)?;
        let kr = rotate(dev, &kv, (&cv, &sv), dims, dims.kv)?;
        let (nq, nk) = (lq.shape().elem_count(), lk.shape().elem_count());
        let scores = dims.b * dims.heads * dims.t * dims.t;
        // SAFETY: the rows pass writes every (row, key <= row) entry, the only ones the columns
        // pass reads; the output's three parts are written in full by the two passes.
        let (mut ds, mut pr, mut out) = unsafe {
            (
                dev.alloc::<f32>(scores)?,
                dev.alloc::<f32>(scores)?,
                dev.alloc::<T>(nq + 2 * nk)?,
            )
        };
        let (t, h, kvh, d) = dims.i32s();
        let scale = dims.scale();
        {
            let (mut dq, mut rest) = out.split_at_mut(nq);
            let f = function(dev, &abi::attn_bwd_rows::DECL, T::DTYPE)?;
            let mut bl = f.builder();
            abi::attn_bwd_rows::push(
                &mut bl, &qr, &kr, &vv, &gv, &cv, &sv, &mut ds, &mut pr, &mut dq, &t, &h, &kvh, &d,
                &scale,
            );
            // SAFETY: warp (head, sequence, row) reads its query, dy row, the keys and values
            // of its KV head up to its row; it writes its row of ds and p and of dq.
            unsafe { bl.launch(abi::grid::attn_bwd_rows(&dims).into()) }
                .map_err(candle_core::Error::wrap)?;
            let (mut dk, mut dv) = rest.split_at_mut(nk);
            let f = function(dev, &abi::attn_bwd_cols::DECL, T::DTYPE)?;
            let mut bl = f.builder();
            abi::attn_bwd_cols::push(
                &mut bl, &qr, &gv, &cv, &sv, &ds, &pr, &mut dk, &mut dv, &t, &h, &kvh, &d,
            );
            let cfg = abi::grid::attn_bwd_cols(&dims).into();
            // SAFETY: warp (KV head, key row, sequence) reads the ds and p entries of rows at
            // or after its key, those rows' rotated queries and dy, and writes its dk and dv
            // rows.
            unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
