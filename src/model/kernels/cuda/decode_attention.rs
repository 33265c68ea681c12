//! A decode step's attention on the GPU (`decode_attention.cu`): every row and query head in
//! one launch, each row over its own cache where it lies. The CPU body and reference is
//! `model/kernels/decode_attention.rs`; `ttarag bench --kernels` compares this one with the
//! composed candle ops on the GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::abi::{self, Addr};
use super::{cuda_device, function, with_addresses};

/// Dynamic shared memory a block may use without opting in: the query and one score per
/// cached position must fit.
const SHARED_BYTES: usize = 48 * 1024;

/// Whether the kernel takes a query `(rows, heads, 1, d)` of this dtype over caches of
/// `max_len` positions (longer ones do not fit its shared memory: the composed path runs).
pub fn applies(q: &Tensor, max_len: usize) -> bool {
    let d = q.dims().last().copied().unwrap_or(0);
    q.device().is_cuda() && fits(q.dtype(), d, max_len)
}

/// Whether the kernel takes `dtype` rows of `d` over caches of `max_len` positions.
pub fn fits(dtype: DType, d: usize, max_len: usize) -> bool {
    super::enabled()
        && matches!(dtype, DType::F32 | DType::BF16)
        && (d + max_len) * 4 <= SHARED_BYTES
}

/// `q` `(rows, heads, 1, d)`; `kv[r]` row `r`'s keys and values, each `(1, kv_heads, len_r, d)`
/// with unit stride on `d` (views into its cache). Returns `(rows, heads, 1, d)`.
pub fn attend_rows(q: &Tensor, kv: &[(Tensor, Tensor)], scale: f64) -> Result<Tensor> {
    let (rows, _, t, _) = q.dims4()?;
    if t != 1 || rows != kv.len() || rows == 0 {
        candle_core::bail!(
            "decode attention: {rows} rows of {t} positions, {} caches",
            kv.len()
        );
    }
    let lens = kv
        .iter()
        .map(|(k, _)| k.dim(2))
        .collect::<Result<Vec<_>>>()?;
    let max_len = lens.into_iter().max().unwrap_or(0);
    let table = table(kv, None)?;
    attend_table(q, &table, kv[0].0.dim(1)?, max_len, scale)
}

/// The kernels' row table for `kv` (see `decode_attention.cu`), on their device. Without
/// `positions` each row's length is its views' length; with them (`(rows,)` u32 on the
/// device) the views are whole buffers, row `r` holds `positions[r] + 1` positions and writes
/// at `positions[r]`, read by the kernels when they run.
pub fn table(kv: &[(Tensor, Tensor)], positions: Option<&Tensor>) -> Result<Tensor> {
    let Some((k0, _)) = kv.first() else {
        candle_core::bail!("decode attention: no rows");
    };
    let (kv_heads, d) = (k0.dim(1)?, k0.dim(3)?);
    let mut strides = Vec::with_capacity(kv.len());
    let mut flat = Vec::with_capacity(kv.len() * 2 + 1);
    for (k, v) in kv {
        for x in [k, v] {
            let (dims, st) = (x.dims(), x.stride());
            if dims.len() != 4 || dims[0] != 1 || dims[1] != kv_heads || dims[3] != d || st[3] != 1
            {
                candle_core::bail!("decode attention: unexpected cache layout {dims:?} / {st:?}");
            }
            if x.dtype() != k0.dtype() {
                candle_core::bail!(
                    "decode attention: caches of {:?} and {:?}",
                    x.dtype(),
                    k0.dtype()
                );
            }
        }
        let len = k.dim(2)?;
        if v.dim(2)? != len {
            candle_core::bail!("decode attention: {len} keys, {} values", v.dim(2)?);
        }
        strides.push([
            k.stride()[1],
            k.stride()[2],
            v.stride()[1],
            v.stride()[2],
            len,
        ]);
        flat.push(k);
        flat.push(v);
    }
    if let Some(p) = positions {
        if p.dtype() != DType::U32 || p.dims() != [kv.len()] || !p.is_contiguous() {
            candle_core::bail!("decode attention: positions {:?} {:?}", p.dims(), p.dtype());
        }
        flat.push(p);
    }
    let dev = cuda_device(k0, "decode attention")?.clone();
    let stream = dev.cuda_stream();
    with_addresses(&stream, &flat, |addresses| {
        let mut table = Vec::with_capacity(kv.len() * 8);
        for (r, s) in strides.iter().enumerate() {
            table.extend([addresses[2 * r], addresses[2 * r + 1]]);
            table.extend(s.iter().map(|&x| x as i64));
            // Where row r's position lies (4-byte elements), or 0: the length above holds.
            table.push(positions.map_or(0, |_| addresses[2 * kv.len()] + 4 * r as i64));
        }
        Tensor::from_vec(table, (kv.len(), 8), k0.device())
    })
}

/// Attention of `q` (`(rows, heads, 1, d)`) over the caches of `table` (from [`table`]) of
/// `kv_heads` heads, whose rows hold at most `max_len` positions. Returns `(rows, heads, 1, d)`.
pub fn attend_table(
    q: &Tensor,
    table: &Tensor,
    kv_heads: usize,
    max_len: usize,
    scale: f64,
) -> Result<Tensor> {
    let (rows, heads, t, _) = q.dims4()?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("decode attention: {heads} query heads over {kv_heads} KV heads");
    }
    if t != 1 || table.dims() != [rows, 8] {
        candle_core::bail!(
            "decode attention: {rows} rows of {t} positions, table {:?}",
            table.dims()
        );
    }
    if !applies(q, max_len) {
        candle_core::bail!("decode attention: {max_len} positions do not fit the kernel");
    }
    q.contiguous()?.apply_op1_no_bwd(&DecodeAttention {
        table: table.clone(),
        group: (heads / kv_heads) as i32,
        scale: scale as f32,
        max_len,
    })
}

/// Writes `k`, `v` (`(rows, kv_heads, 1, d)`) into the caches of `table` (from [`table`] with
/// positions), each row at its position, in one launch.
pub fn write_rows(k: &Tensor, v: &Tensor, table: &Tensor) -> Result<()> {
    let (rows, kv_heads, t, d) = k.dims4()?;
    if t != 1 || v.dims() != k.dims() || table.dims() != [rows, 8] || v.dtype() != k.dtype() {
        candle_core::bail!(
            "cache write: keys {:?}, values {:?}, table {:?}",
            k.dims(),
            v.dims(),
            table.dims()
        );
    }
    let (k, v) = (k.contiguous()?, v.contiguous()?);
    let dev = cuda_device(&k, "cache write")?.clone();
    let stream = dev.cuda_stream();
    let f = function(&dev, &abi::kv_write::DECL, k.dtype())?;
    with_addresses(&stream, &[&k, &v, table], |a| {
        let mut bl = f.builder();
        let [src_k, src_v, tab] = [a[0], a[1], a[2]].map(|p| Addr(p as u64));
        let (h32, d32) = (kv_heads as i32, d as i32);
        // Raw addresses name no element type (`()`); `function` picked the dtype's entry.
        abi::kv_write::push::<()>(&mut bl, &src_k, &src_v, &tab, &h32, &d32);
        let cfg = abi::grid::kv_write(kv_heads, rows).into();
        // SAFETY: block (head, row) copies that head's `d` elements of row `r` from the
        // contiguous sources into the buffers the table addresses, at a position the kernel
        // bounds by the capacity; the caller keeps the buffers alive (a `CacheRows`).
        unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        Ok(())
    })
}

struct DecodeAttention {
    table: Tensor,
    group: i32,
    scale: f32,
    max_len: usize,
}

impl DecodeAttention {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        l: &Layout,
    ) -> Result<CudaStorage> {
        let (rows, heads, _, d) = l.shape().dims4()?;
        let dev = &q.device;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("decode attention: contiguous query only");
        };
        let qv = q.as_cuda_slice::<T>()?.slice(a..b);
        let (ts, tl) = self.table.storage_and_layout();
        let candle_core::Storage::Cuda(ts) = &*ts else {
            candle_core::bail!("decode attention: the row table is not on the GPU");
        };
        let tv = ts.as_cuda_slice::<i64>()?.slice(tl.start_offset()..);
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(b - a) }?;
        let f = function(dev, &abi::decode_attention::DECL, q.dtype())?;
        let mut bl = f.builder();
        let (h32, d32) = (heads as i32, d as i32);
        abi::decode_attention::push(
            &mut bl,
            &qv,
            &tv,
            &mut out,
            &h32,
            &self.group,
            &d32,
            &self.scale,
        );
        let cfg = abi::grid::decode_attention(heads, rows, d, self.max_len).into();
        // SAFETY: one block per (head, row) reading its row's table entry, whose addresses
        // and strides describe live cache views held by the caller; shared memory holds the
        // query and the longest row's scores.
        unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp1 for DecodeAttention {
    fn name(&self) -> &'static str {
        "cuda-decode-attention"
    }

    super::cuda_only!(1);

    fn cuda_fwd(&self, q: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match q.dtype() {
            DType::F32 => self.launch::<f32>(q, l)?,
            DType::BF16 => self.launch::<half::bf16>(q, l)?,
            d => candle_core::bail!("decode attention: {d:?} query"),
        };
        Ok((out, l.shape().clone()))
    }
}
