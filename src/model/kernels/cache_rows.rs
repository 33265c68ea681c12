//! The rows of a decode step whose positions lie on the device: each row's new keys and values
//! written into its cache buffers at its position, then its attention over the cache up to
//! there. A step built on these reads nothing from the host that changes from one token to the
//! next (the position tensor is written between steps), so on a GPU it can be captured once as
//! a graph and replayed per token. On the CPU the same step reads the positions and runs the
//! ordinary in-place write and [`decode_attention::attend_rows`], so it gives the bits of an
//! ordinary decode step; tests compare the two there.

use candle_core::{DType, Device, Result, Tensor};

use super::decode_attention;

/// One layer's cache buffers of every row of a step, and where each row's position lies.
pub struct CacheRows {
    /// Row `r`'s key and value buffers, `(1, kv_heads, capacity, head_dim)`.
    buffers: Vec<(Tensor, Tensor)>,
    /// `(rows,)` u32: row `r` writes at `positions[r]` and attends over `0..=positions[r]`.
    positions: Tensor,
    /// The GPU's row table (addresses, strides, capacity and position address per row),
    /// uploaded once here so that a captured step uploads nothing.
    #[cfg(feature = "cuda")]
    table: Option<Tensor>,
    /// KV heads (the GPU kernels' layout).
    #[cfg(feature = "cuda")]
    kv_heads: usize,
    /// The most positions a row's buffers may hold: the GPU kernel's shared memory is sized
    /// for it, so rows rebound later (see [`rebind`](Self::rebind)) must stay within it.
    bound: usize,
}

/// Whether a step of `dtype` on `device` over caches of `capacity` positions runs on these
/// rows: f32 on the CPU; on a GPU where its decode-attention kernel takes the capacity.
pub fn applies(device: &Device, dtype: DType, head_dim: usize, capacity: usize) -> bool {
    match device {
        Device::Cpu => dtype == DType::F32,
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => super::cuda::decode_attention::fits(dtype, head_dim, capacity),
        _ => {
            let _ = (head_dim, capacity);
            false
        }
    }
}

impl CacheRows {
    /// `buffers[r]` is row `r`'s whole key and value buffers; `positions` `(rows,)` u32 is read
    /// on every [`write`](Self::write) and [`attend`](Self::attend), so writing it in place
    /// moves every row on.
    pub fn new(buffers: Vec<(Tensor, Tensor)>, positions: &Tensor) -> Result<Self> {
        let bound = buffers.iter().map(|(k, _)| k.dim(2).unwrap_or(0)).max();
        Self::with_bound(buffers, positions, bound.unwrap_or(0))
    }

    /// As [`new`](Self::new), for rows of at most `bound` positions now and after any
    /// [`rebind`](Self::rebind).
    pub fn with_bound(
        buffers: Vec<(Tensor, Tensor)>,
        positions: &Tensor,
        bound: usize,
    ) -> Result<Self> {
        if buffers.is_empty()
            || positions.dims() != [buffers.len()]
            || positions.dtype() != DType::U32
        {
            candle_core::bail!(
                "cache rows: positions {:?} {:?} for {} rows",
                positions.dims(),
                positions.dtype(),
                buffers.len()
            );
        }
        check(&buffers, bound)?;
        #[cfg(feature = "cuda")]
        let table = match positions.device() {
            Device::Cuda(_) => Some(super::cuda::decode_attention::table(
                &buffers,
                Some(positions),
            )?),
            _ => None,
        };
        Ok(Self {
            #[cfg(feature = "cuda")]
            kv_heads: buffers[0].0.dim(1)?,
            buffers,
            positions: positions.clone(),
            #[cfg(feature = "cuda")]
            table,
            bound,
        })
    }

    /// The most positions a row may hold.
    pub fn bound(&self) -> usize {
        self.bound
    }

    /// Points the rows at other buffers (as many rows, each of the same layout and within the
    /// bound), in place: on a GPU the row table is rewritten where it lies, so a step captured
    /// over these rows reads the new buffers when replayed. The old buffers are let go.
    pub fn rebind(&mut self, buffers: Vec<(Tensor, Tensor)>) -> Result<()> {
        let (k0, _) = &self.buffers[0];
        let like = |k: &Tensor| {
            k.dtype() == k0.dtype()
                && k.device().same_device(k0.device())
                && k.dim(1).ok() == k0.dim(1).ok()
                && k.dim(3).ok() == k0.dim(3).ok()
        };
        if buffers.len() != self.buffers.len() || !buffers.iter().all(|(k, _)| like(k)) {
            candle_core::bail!(
                "cache rows: {} rows rebound to {} unlike buffers",
                self.buffers.len(),
                buffers.len()
            );
        }
        check(&buffers, self.bound)?;
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.table {
            let fresh = super::cuda::decode_attention::table(&buffers, Some(&self.positions))?;
            table.slice_set(&fresh, 0, 0)?;
        }
        self.buffers = buffers;
        Ok(())
    }

    /// Writes `k`, `v` (`(rows, kv_heads, 1, head_dim)`) into each row's buffers at its position.
    pub fn write(&self, k: &Tensor, v: &Tensor) -> Result<()> {
        let held = self.buffers[0].0.dtype();
        if k.dtype() != held || v.dtype() != held || k.dim(0)? != self.buffers.len() {
            candle_core::bail!(
                "cache rows: {:?} {:?} keys for {} rows of {held:?}",
                k.dims(),
                k.dtype(),
                self.buffers.len()
            );
        }
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.table {
            return super::cuda::decode_attention::write_rows(k, v, table);
        }
        for (r, (p, (kb, vb))) in self.host_positions()?.iter().zip(&self.buffers).enumerate() {
            kb.slice_set(&k.narrow(0, r, 1)?, 2, *p)?;
            vb.slice_set(&v.narrow(0, r, 1)?, 2, *p)?;
        }
        Ok(())
    }

    /// Attention of `q` (`(rows, heads, 1, head_dim)`) over each row's cache up to and with its
    /// position: the keys and values [`write`](Self::write) put there included.
    pub fn attend(&self, q: &Tensor, scale: f64) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(table) = &self.table {
            return super::cuda::decode_attention::attend_table(
                q,
                table,
                self.kv_heads,
                self.bound,
                scale,
            );
        }
        let views = self
            .host_positions()?
            .iter()
            .zip(&self.buffers)
            .map(|(p, (k, v))| Ok((k.narrow(2, 0, p + 1)?, v.narrow(2, 0, p + 1)?)))
            .collect::<Result<Vec<_>>>()?;
        decode_attention::attend_rows(q, &views, scale)
    }

    /// On a GPU, one launch for what a step does before attending: `q`, `k`, `v`
    /// (`(rows, 1, heads * head_dim)` and `(rows, 1, kv_heads * head_dim)`, where the
    /// projections left them) rotated by each row's angles `cos`, `sin` (`(rows, 1,
    /// head_dim / 2)`), `k` and `v` written at each row's position, and `q` returned as
    /// `(rows, heads, 1, head_dim)`. `None` where that kernel does not serve (the CPU, other
    /// dtypes): the caller splits, rotates and [`write`](Self::write)s.
    pub fn rope_write(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
    ) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if self.rope_writes(&[q, k, v, cos, sin]) {
            return self
                .rope_write_lora(q, k, v, cos, sin, heads, None)
                .map(Some);
        }
        let _ = (q, k, v, cos, sin, heads);
        Ok(None)
    }

    /// Whether [`rope_write`](Self::rope_write)'s one launch serves these operands here: a
    /// GPU, the kernels on, every operand in the cache's dtype.
    #[cfg(feature = "cuda")]
    pub fn rope_writes(&self, operands: &[&Tensor]) -> bool {
        let held = self.buffers[0].0.dtype();
        self.table.is_some()
            && operands.iter().all(|t| t.dtype() == held)
            && operands
                .first()
                .is_some_and(|q| super::cuda::decode_step::applies(q))
    }

    /// [`rope_write`](Self::rope_write) where it serves ([`rope_writes`](Self::rope_writes)),
    /// with `lora`'s deltas on q, k and v added in the same launch (see
    /// `cuda::decode_step::rope_cache_write`).
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    pub fn rope_write_lora(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        lora: Option<(&Tensor, [Option<super::cuda::decode_step::PartDelta>; 3])>,
    ) -> Result<Tensor> {
        let Some(table) = &self.table else {
            candle_core::bail!("rope write: cache rows without a device table");
        };
        super::cuda::decode_step::rope_cache_write(
            q,
            k,
            v,
            cos,
            sin,
            table,
            heads,
            self.kv_heads,
            lora,
        )
    }

    fn host_positions(&self) -> Result<Vec<usize>> {
        let capacity = self.buffers.iter().map(|(k, _)| k.dim(2));
        self.positions
            .to_vec1::<u32>()?
            .into_iter()
            .zip(capacity)
            .map(|(p, cap)| {
                let (p, cap) = (p as usize, cap?);
                if p >= cap {
                    candle_core::bail!("cache rows: position {p} past a capacity of {cap}");
                }
                Ok(p)
            })
            .collect()
    }
}

/// Row buffers as [`CacheRows`] take them: contiguous `(1, kv_heads, capacity, head_dim)` keys
/// and values alike, of one KV-head count, none longer than `bound`.
fn check(buffers: &[(Tensor, Tensor)], bound: usize) -> Result<()> {
    let heads = buffers.first().map(|(k, _)| k.dim(1)).transpose()?;
    for (k, v) in buffers {
        if k.dims() != v.dims() || k.rank() != 4 || k.dim(0)? != 1 || !k.is_contiguous() {
            candle_core::bail!("cache rows: buffers {:?} / {:?}", k.dims(), v.dims());
        }
        if Some(k.dim(1)?) != heads || k.dim(2)? > bound {
            candle_core::bail!(
                "cache rows: buffers {:?} past {bound} positions or unlike the others",
                k.dims()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(shape: &[usize], start: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| ((i as f32 + start) * 0.37).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Each row writes at its own position and attends up to there, as the row's cache
    /// appended and attended by hand would.
    #[test]
    fn rows_write_at_their_positions_and_attend_up_to_them() {
        let (kv_heads, heads, d, cap) = (2, 4, 8, 6);
        let buffers: Vec<(Tensor, Tensor)> = (0..2)
            .map(|r| {
                let k = filled(&[1, kv_heads, cap, d], 10.0 * r as f32);
                (k.clone(), filled(&[1, kv_heads, cap, d], 5.0 + r as f32))
            })
            .collect();
        let before: Vec<(Tensor, Tensor)> = buffers
            .iter()
            .map(|(k, v)| (k.copy().unwrap(), v.copy().unwrap()))
            .collect();
        let positions = Tensor::new(&[3u32, 0], &Device::Cpu).unwrap();
        let rows = CacheRows::new(buffers.clone(), &positions).unwrap();
        let (k, v) = (
            filled(&[2, kv_heads, 1, d], 50.0),
            filled(&[2, kv_heads, 1, d], 70.0),
        );
        let q = filled(&[2, heads, 1, d], 90.0);
        rows.write(&k, &v).unwrap();
        let got = rows.attend(&q, 0.5).unwrap();
        for (r, p) in [(0usize, 3usize), (1, 0)] {
            // By hand: the row's old cache up to its position, then the new entry.
            let (k0, v0) = &before[r];
            let kr = Tensor::cat(
                &[&k0.narrow(2, 0, p).unwrap(), &k.narrow(0, r, 1).unwrap()],
                2,
            )
            .unwrap();
            let vr = Tensor::cat(
                &[&v0.narrow(2, 0, p).unwrap(), &v.narrow(0, r, 1).unwrap()],
                2,
            )
            .unwrap();
            let want = decode_attention::attend_rows(&q.narrow(0, r, 1).unwrap(), &[(kr, vr)], 0.5)
                .unwrap();
            let a: Vec<f32> = got
                .narrow(0, r, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "row {r}");
            // Positions past the row's own stay as they were.
            let after = buffers[r].0.narrow(2, p + 1, cap - p - 1).unwrap();
            let was = before[r].0.narrow(2, p + 1, cap - p - 1).unwrap();
            let diff: f32 = (after - was)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert_eq!(diff, 0.0, "row {r} wrote past its position");
        }
        // Wrong dtype, wrong row count, a position past the buffers: refused.
        assert!(rows.write(&k.to_dtype(DType::F64).unwrap(), &v).is_err());
        assert!(rows
            .write(&k.narrow(0, 0, 1).unwrap(), &v.narrow(0, 0, 1).unwrap())
            .is_err());
        let far = Tensor::new(&[6u32, 0], &Device::Cpu).unwrap();
        let rows = CacheRows::new(buffers, &far).unwrap();
        assert!(rows.write(&k, &v).is_err());
        assert!(rows.attend(&q, 0.5).is_err());
    }
}
