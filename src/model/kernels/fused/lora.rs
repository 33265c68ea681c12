//! A LoRA delta `scale B (A x)` as one op with its backward: composed from candle's ops it is
//! two broadcast products and a scale forward, and backward the products' gradients, the
//! broadcast factors' sums over the batch and every gradient's zero-fill and add, about a
//! dozen ops per adapted projection and layer. Only a GPU takes it (`cuda::lora_training`, with
//! `[model] cuda_fused_training`), where each op is a launch; the CPU keeps the composed delta,
//! and this op's CPU body is the reference its CUDA body is tested against.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::{dot, slice, with_f32};

/// The largest rank the GPU kernels take (their shared memory holds one row's `A x`: the
/// `MAX_RANK` of `lora.cu`, `lora_training.cu` and `decode_step.cu`).
pub const MAX_RANK: usize = 64;

struct LoraDelta {
    scale: f32,
    /// `(rows, in, outs, rank)`, checked by [`lora_delta`].
    dims: (usize, usize, usize, usize),
}

/// `x`'s shape with its last dimension `outs`.
fn out_shape(x: &[usize], outs: usize) -> Shape {
    let mut d = x.to_vec();
    if let Some(last) = d.last_mut() {
        *last = outs;
    }
    Shape::from(d)
}

/// `h = A x` for each row of `x`: `(rows, rank)`.
fn shrink(x: &[f32], a: &[f32], inp: usize, rank: usize) -> Vec<f32> {
    let mut h = Vec::with_capacity(x.len() / inp.max(1) * rank);
    for xr in x.chunks_exact(inp.max(1)) {
        h.extend(a.chunks_exact(inp.max(1)).take(rank).map(|ak| dot(ak, xr)));
    }
    h
}

impl CustomOp3 for LoraDelta {
    fn name(&self) -> &'static str {
        "fused-lora-delta"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, a, b) = (slice(sx, lx)?, slice(sa, la)?, slice(sb, lb)?);
        let (_, inp, outs, rank) = self.dims;
        let h = shrink(x, a, inp, rank);
        let mut y = Vec::with_capacity(h.len() / rank.max(1) * outs);
        for hr in h.chunks_exact(rank.max(1)) {
            y.extend(
                b.chunks_exact(rank.max(1))
                    .map(|bj| self.scale * dot(bj, hr)),
            );
        }
        Ok((CpuStorage::F32(y), out_shape(lx.dims(), outs)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = crate::model::kernels::cuda::lora_training::delta(
            sx, lx, sa, la, sb, lb, self.scale, self.dims,
        )?;
        Ok((y, out_shape(lx.dims(), self.dims.2)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, da, db) = crate::model::kernels::cuda::lora_training::grads(
                x, a, b, g, self.scale, self.dims,
            )?;
            return Ok((keep(dx, x), keep(da, a), keep(db, b)));
        }
        let (rows, inp, outs, rank) = self.dims;
        let s = self.scale;
        let (dx, da, db) = with_f32(x, |x| {
            with_f32(a, |a| {
                with_f32(b, |b| {
                    with_f32(g, |g| {
                        // Per row: h = A x, dh = s B^T g, dx = A^T dh; then over the rows in
                        // order dA += dh x^T, dB += s g h^T.
                        let h = shrink(x, a, inp, rank);
                        let mut dh = vec![0f32; rows * rank];
                        for (r, dhr) in dh.chunks_exact_mut(rank.max(1)).enumerate() {
                            let gr = &g[r * outs..(r + 1) * outs];
                            for (k, d) in dhr.iter_mut().enumerate() {
                                *d = s * (0..outs).map(|j| b[j * rank + k] * gr[j]).sum::<f32>();
                            }
                        }
                        let mut dx = vec![0f32; rows * inp];
                        let (mut da, mut db) = (vec![0f32; rank * inp], vec![0f32; outs * rank]);
                        for r in 0..rows {
                            let (xr, gr) =
                                (&x[r * inp..(r + 1) * inp], &g[r * outs..(r + 1) * outs]);
                            let (hr, dhr) =
                                (&h[r * rank..(r + 1) * rank], &dh[r * rank..(r + 1) * rank]);
                            let dxr = &mut dx[r * inp..(r + 1) * inp];
                            for k in 0..rank {
                                super::axpy(dhr[k], &a[k * inp..(k + 1) * inp], dxr);
                                super::axpy(dhr[k], xr, &mut da[k * inp..(k + 1) * inp]);
                            }
                            for (j, dbj) in db.chunks_exact_mut(rank.max(1)).enumerate() {
                                super::axpy(gr[j], hr, dbj);
                            }
                        }
                        db.iter_mut().for_each(|v| *v *= s);
                        (dx, da, db)
                    })
                })
            })
        })????;
        let t = |v: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            Ok(keep(
                Tensor::from_vec(v, like.shape(), like.device())?,
                like,
            ))
        };
        Ok((t(dx, x)?, t(da, a)?, t(db, b)?))
    }
}

/// A gradient for `like` only where it takes part in the graph (a frozen adapter's factors,
/// a domain adapter's, need none).
fn keep(g: Tensor, like: &Tensor) -> Option<Tensor> {
    like.track_op().then_some(g)
}

/// Whether [`lora_delta`] takes these operands on a GPU: the fused training path on
/// (`fused::takes`), one dtype throughout, `a` `(rank, in)` with rank at most [`MAX_RANK`].
/// The CPU keeps the composed delta (its bits are the CPU's answers).
pub fn lora_takes(x: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    let rank = a.dims().first().copied().unwrap_or(0);
    !x.device().is_cpu()
        && super::takes(x.dtype(), x.device())
        && a.dtype() == x.dtype()
        && b.dtype() == x.dtype()
        && a.rank() == 2
        && b.rank() == 2
        && (1..=MAX_RANK).contains(&rank)
}

/// `scale B (A x)` for each row of `x` `(.., in)`, with `a` `(rank, in)` and `b` `(outs, rank)`:
/// `(.., outs)`. f32 on the CPU; f32 or bf16 on a GPU.
pub fn lora_delta(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    let inp = x.dims().last().copied().unwrap_or(0);
    let (ad, bd) = (a.dims(), b.dims());
    if ad.len() != 2 || bd.len() != 2 || ad[1] != inp || bd[1] != ad[0] || ad[0] > MAX_RANK {
        candle_core::bail!("lora delta: x {:?}, a {ad:?}, b {bd:?}", x.dims());
    }
    if x.device().is_cpu() && x.dtype() != DType::F32 {
        candle_core::bail!("lora delta: f32 only on the CPU");
    }
    let rows = x.elem_count() / inp.max(1);
    let op = LoraDelta {
        scale: scale as f32,
        dims: (rows, inp, bd[0], ad[0]),
    };
    x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}
