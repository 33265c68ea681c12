//! A decode step's small neighbouring ops fused on the GPU (`decode_step.cu`): rotary embedding
//! with the cache write, the residual add with the next RMS norm, and SwiGLU read from the
//! joint gate/up product. Each replaces two to six launches of candle's composed ops, which
//! stay the reference (`ttarag bench --kernels` compares them on the GPU) and what the CPU
//! runs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::abi::{self, Addr, LoraPart};
use super::{contiguous_view, function, held_view, with_addresses};
use crate::model::kernels::fused::LORA_MAX_RANK as MAX_RANK;
use crate::model::kernels::rows::even_rows;

/// Whether the kernels take `x` of a decode step: a CUDA tensor of f32 or bf16, kernels on.
pub fn applies(x: &Tensor) -> bool {
    super::enabled() && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// The row stride of a `(rows, 1, width)` part whose last dimension is contiguous (a view into
/// a joint product, or a tensor of its own), or an error.
fn row_stride(l: &Layout, rows: usize, width: usize, what: &str) -> Result<i64> {
    let (dims, st) = (l.dims(), l.stride());
    match even_rows(dims, st) {
        Some(rs) if dims == [rows, 1, width] => Ok(rs as i64),
        _ => candle_core::bail!("{what}: part {dims:?} / {st:?}, expected ({rows}, 1, {width})"),
    }
}

/// A LoRA delta on one of q, k, v for [`rope_cache_write`] to add: the factors
/// `Adapter::row_factors` gives, one pair for every row (`scales` `None`, `a` `(rank, in)`,
/// `b` `(outs, rank)`) or a pair per row (`a` `(rows, rank, in)`, `b` `(rows, outs, rank)`,
/// `scales` `(rows,)` f32).
pub struct PartDelta<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scales: Option<&'a Tensor>,
    pub scale: f64,
}

impl PartDelta<'_> {
    /// The factors' rank: `a`'s next-to-last dimension (per row or shared).
    fn rank(&self) -> usize {
        self.a.dims().iter().rev().nth(1).copied().unwrap_or(0)
    }

    /// Whether the kernel takes this delta on a part of `outs` outputs for `rows` rows of
    /// `inp` inputs in `dtype`.
    pub fn fits(&self, rows: usize, inp: usize, outs: usize, dtype: DType) -> bool {
        let rank = self.rank();
        let shapes = match self.scales {
            Some(s) => {
                self.a.dims() == [rows, rank, inp]
                    && self.b.dims() == [rows, outs, rank]
                    && s.dims() == [rows]
            }
            None => self.a.dims() == [rank, inp] && self.b.dims() == [outs, rank],
        };
        shapes
            && (1..=MAX_RANK).contains(&rank)
            && self.a.dtype() == dtype
            && self.b.dtype() == dtype
    }

    fn held(&self, rows: usize) -> Result<HeldDelta> {
        let rank = self.rank();
        let per_row = self.scales.is_some();
        Ok(HeldDelta {
            a: self.a.contiguous()?,
            b: self.b.contiguous()?,
            scales: self
                .scales
                .map(|s| s.to_dtype(DType::F32)?.contiguous())
                .transpose()?,
            scale: self.scale as f32,
            rank,
            strides: match per_row {
                true => (
                    self.a.elem_count() / rows.max(1),
                    self.b.elem_count() / rows.max(1),
                ),
                false => (0, 0),
            },
        })
    }
}

/// A [`PartDelta`] held by the op, contiguous.
struct HeldDelta {
    a: Tensor,
    b: Tensor,
    scales: Option<Tensor>,
    scale: f32,
    rank: usize,
    strides: (usize, usize),
}

/// `q`, `k`, `v` (`(rows, 1, heads * d)` and `(rows, 1, kv_heads * d)`, the last dimension
/// contiguous) of one position per row: returns `q` rotated, `(rows, heads, 1, d)`, and writes
/// `k` rotated and `v` into the caches of `table` (see `decode_attention::table`, with
/// positions) at each row's position. `cos`, `sin`: each row's angles, `(rows, 1, d / 2)`.
/// With `lora`, the projections' input `x` `(rows, 1, in)` and a delta for each of q, k, v
/// that has one (each [`PartDelta::fits`]): the deltas are added before the rotation, as the
/// LoRA add would have (`lora.cu`), in the same launch.
#[allow(clippy::too_many_arguments)]
pub fn rope_cache_write(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    table: &Tensor,
    heads: usize,
    kv_heads: usize,
    lora: Option<(&Tensor, [Option<PartDelta>; 3])>,
) -> Result<Tensor> {
    let rows = q.dim(0)?;
    let d = q.dim(2)? / heads.max(1);
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    if !d.is_multiple_of(2)
        || cos.dims() != [rows, 1, d / 2]
        || sin.dims() != cos.dims()
        || table.dims() != [rows, 8]
        || [k.dtype(), v.dtype(), cos.dtype(), sin.dtype()] != [q.dtype(); 4]
    {
        candle_core::bail!(
            "rope cache write: q {:?}, angles {:?} {:?}, table {:?}",
            q.dims(),
            cos.dims(),
            cos.dtype(),
            table.dims()
        );
    }
    let lora = match lora {
        Some((x, parts)) => {
            let inp = x.dims().last().copied().unwrap_or(0);
            let outs = [heads * d, kv_heads * d, kv_heads * d];
            let fit = parts
                .iter()
                .zip(outs)
                .all(|(p, o)| p.as_ref().is_none_or(|p| p.fits(rows, inp, o, q.dtype())));
            if x.dims() != [rows, 1, inp] || x.dtype() != q.dtype() || !fit {
                candle_core::bail!(
                    "rope cache write: LoRA deltas that do not fit x {:?}",
                    x.dims()
                );
            }
            let [pq, pk, pv] = parts;
            let held = |p: Option<PartDelta>| p.map(|p| p.held(rows)).transpose();
            Some(StepLora {
                x: x.contiguous()?,
                parts: [held(pq)?, held(pk)?, held(pv)?],
            })
        }
        None => None,
    };
    q.apply_op3_no_bwd(
        k,
        v,
        &RopeCacheWrite {
            cos,
            sin,
            table: table.clone(),
            heads,
            kv_heads,
            d,
            lora,
        },
    )
}

/// The projections' input and the deltas `rope_cache_write` adds.
struct StepLora {
    x: Tensor,
    parts: [Option<HeldDelta>; 3],
}

struct RopeCacheWrite {
    cos: Tensor,
    sin: Tensor,
    table: Tensor,
    heads: usize,
    kv_heads: usize,
    d: usize,
    lora: Option<StepLora>,
}

impl RopeCacheWrite {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        lq: &Layout,
        k: &CudaStorage,
        lk: &Layout,
        v: &CudaStorage,
        lv: &Layout,
    ) -> Result<CudaStorage> {
        const WHAT: &str = "rope cache write";
        let dev = &q.device;
        let (rows, heads, kv, d) = (lq.dims()[0], self.heads, self.kv_heads, self.d);
        let q_rs = row_stride(lq, rows, heads * d, WHAT)?;
        let k_rs = row_stride(lk, rows, kv * d, WHAT)?;
        let v_rs = row_stride(lv, rows, kv * d, WHAT)?;
        let qv = q.as_cuda_slice::<T>()?.slice(lq.start_offset()..);
        let kv_ = k.as_cuda_slice::<T>()?.slice(lk.start_offset()..);
        let vv = v.as_cuda_slice::<T>()?.slice(lv.start_offset()..);
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (ts, tl) = self.table.storage_and_layout();
        let (cv, sv) = (
            held_view::<T>(&cs, cl, WHAT)?,
            held_view::<T>(&ss, sl, WHAT)?,
        );
        let tv = held_view::<i64>(&ts, tl, WHAT)?;
        // SAFETY: the kernel writes every element of the rotated query.
        let mut out = unsafe { dev.alloc::<T>(rows * heads * d) }?;
        // The deltas' operands by address (the struct the kernel takes holds them).
        let mut held: Vec<&Tensor> = vec![];
        if let Some(l) = &self.lora {
            held.push(&l.x);
            for p in l.parts.iter().flatten() {
                held.push(&p.a);
                held.push(&p.b);
                held.extend(p.scales.as_ref());
            }
        }
        let stream = dev.cuda_stream();
        with_addresses(&stream, &held, |addresses| {
            let mut at = addresses.iter().copied();
            let mut next = || at.next().unwrap_or(0) as u64;
            let (x, inp) = match &self.lora {
                Some(l) => (Addr(next()), l.x.dims().last().copied().unwrap_or(0) as i32),
                None => (Addr::NULL, 0),
            };
            let mut parts = [LoraPart::default(); 3];
            if let Some(l) = &self.lora {
                for (slot, p) in parts.iter_mut().zip(&l.parts) {
                    if let Some(p) = p {
                        *slot = LoraPart {
                            a: next(),
                            b: next(),
                            scales: if p.scales.is_some() { next() } else { 0 },
                            a_stride: p.strides.0 as i64,
                            b_stride: p.strides.1 as i64,
                            scale: p.scale,
                            rank: p.rank as i32,
                        };
                    }
                }
            }
            let f = function(dev, &abi::rope_cache_write::DECL, q.dtype())?;
            let mut bl = f.builder();
            let (h32, d32) = (heads as i32, d as i32);
            abi::rope_cache_write::push(
                &mut bl, &qv, &kv_, &vv, &q_rs, &k_rs, &v_rs, &cv, &sv, &tv, &mut out, &h32, &d32,
                &x, &inp, &parts[0], &parts[1], &parts[2],
            );
            let cfg = abi::grid::rope_cache_write(heads, kv, rows).into();
            if rows > 0 {
                // SAFETY: block (head, row) reads that head's `d` elements of row `r` of q, k
                // or v at the row strides checked above, the row's angles, with deltas the
                // row's input and factors (shapes checked by `PartDelta::fits`, addresses live
                // under `with_addresses`), and writes its rotated query or its key and value
                // into the cache buffers the table addresses (held alive by the caller's
                // `CacheRows`) at a position the kernel bounds by the capacity.
                unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
            }
            Ok(())
        })?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for RopeCacheWrite {
    fn name(&self) -> &'static str {
        "cuda-rope-cache-write"
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
            d => candle_core::bail!("rope cache write: {d:?} operands"),
        };
        let rows = lq.dims()[0];
        Ok((out, Shape::from((rows, self.heads, 1, self.d))))
    }
}

/// `(x + a, rms_norm(x + a) * w)`: the residual stream after an add, and its norm, in one
/// launch. `x`, `a` of one shape whose last dimension is `w`'s length; `w` of their dtype.
pub fn add_rms_norm(x: &Tensor, a: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let n = w.elem_count();
    if x.dims() != a.dims()
        || x.dims().last() != Some(&n)
        || a.dtype() != x.dtype()
        || w.dtype() != x.dtype()
    {
        candle_core::bail!(
            "add rms norm: {:?} + {:?} {:?}, weight {:?} {:?}",
            x.dims(),
            a.dims(),
            a.dtype(),
            w.dims(),
            w.dtype()
        );
    }
    let both = x.contiguous()?.apply_op3_no_bwd(
        &a.contiguous()?,
        &w.contiguous()?,
        &AddRmsNorm { eps: eps as f32 },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

struct AddRmsNorm {
    eps: f32,
}

impl AddRmsNorm {
    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        a: &CudaStorage,
        la: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> Result<CudaStorage> {
        const WHAT: &str = "add rms norm";
        let dev = &x.device;
        let n = lw.shape().elem_count();
        let len = lx.shape().elem_count();
        let rows = (len / n.max(1)) as i64;
        let (xv, av, wv) = (
            contiguous_view::<T>(x, lx, WHAT)?,
            contiguous_view::<T>(a, la, WHAT)?,
            contiguous_view::<T>(w, lw, WHAT)?,
        );
        // SAFETY: the kernel writes both halves in full.
        let mut out = unsafe { dev.alloc::<T>(2 * len) }?;
        let f = function(dev, &abi::add_rms_norm::DECL, x.dtype())?;
        let mut bl = f.builder();
        let n32 = n as i32;
        abi::add_rms_norm::push(&mut bl, &xv, &av, &wv, &mut out, &rows, &n32, &self.eps);
        let cfg = abi::grid::add_rms_norm(rows as usize).into();
        if rows > 0 && n > 0 {
            // SAFETY: one block per row of `n` contiguous elements of x and a, as the kernel
            // reads them; it writes row r of both halves of `out`.
            unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "cuda-add-rms-norm"
    }

    super::cuda_only!(3);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        a: &CudaStorage,
        la: &Layout,
        w: &CudaStorage,
        lw: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => self.launch::<f32>(x, lx, a, la, w, lw)?,
            DType::BF16 => self.launch::<half::bf16>(x, lx, a, la, w, lw)?,
            d => candle_core::bail!("add rms norm: {d:?} operands"),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(lx.dims());
        Ok((out, Shape::from(dims)))
    }
}

/// `silu(gate) * up` from the joint product `gu` (`(.., 2 * n)`: gate then up), `(.., n)`.
pub fn swiglu_joint(gu: &Tensor) -> Result<Tensor> {
    let two_n = gu.dims().last().copied().unwrap_or(0);
    if !two_n.is_multiple_of(2) {
        candle_core::bail!("swiglu joint: an odd width {two_n}");
    }
    gu.contiguous()?.apply_op1_no_bwd(&SwigluJoint)
}

struct SwigluJoint;

impl SwigluJoint {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        gu: &CudaStorage,
        l: &Layout,
    ) -> Result<CudaStorage> {
        let dev = &gu.device;
        let n = l.dims().last().copied().unwrap_or(0) / 2;
        let rows = (l.shape().elem_count() / (2 * n).max(1)) as i64;
        let gv = contiguous_view::<T>(gu, l, "swiglu joint")?;
        let len = rows as usize * n;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(len) }?;
        let f = function(dev, &abi::swiglu_joint::DECL, gu.dtype())?;
        let mut bl = f.builder();
        let n32 = n as i32;
        abi::swiglu_joint::push(&mut bl, &gv, &mut out, &rows, &n32);
        let cfg = abi::grid::swiglu_joint(len).into();
        if len > 0 {
            // SAFETY: a grid-stride pass over `rows * n` outputs, each reading its gate and
            // up element of the contiguous joint product.
            unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp1 for SwigluJoint {
    fn name(&self) -> &'static str {
        "cuda-swiglu-joint"
    }

    super::cuda_only!(1);

    fn cuda_fwd(&self, gu: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match gu.dtype() {
            DType::F32 => self.launch::<f32>(gu, l)?,
            DType::BF16 => self.launch::<half::bf16>(gu, l)?,
            d => candle_core::bail!("swiglu joint: {d:?} operands"),
        };
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last /= 2;
        }
        Ok((out, Shape::from(dims)))
    }
}
