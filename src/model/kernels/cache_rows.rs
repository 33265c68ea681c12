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
        if positions.dims() != [buffers.len()] || positions.dtype() != DType::U32 {
            candle_core::bail!(
                "cache rows: positions {:?} {:?} for {} rows",
                positions.dims(),
                positions.dtype(),
                buffers.len()
            );
        }
        for (k, v) in &buffers {
            if k.dims() != v.dims() || k.rank() != 4 || k.dim(0)? != 1 || !k.is_contiguous() {
                candle_core::bail!("cache rows: buffers {:?} / {:?}", k.dims(), v.dims());
            }
        }
        #[cfg(feature = "cuda")]
        let table = match positions.device() {
            Device::Cuda(_) => Some(super::cuda::decode_attention::table(
                &buffers,
                Some(positions),
            )?),
            _ => None,
        };
        Ok(Self {
            buffers,
            positions: positions.clone(),
            #[cfg(feature = "cuda")]
            table,
        })
    }

    /// Writes `k`, `v` (`(rows, kv_heads, 1, head_dim)`) into each row's buffers at its position.
    pub fn write(&self, k: &Tensor, v: &Tensor) -> Result<()> {
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
            let kv_heads = self.buffers[0].0.dim(1)?;
            let capacity = self
                .buffers
                .iter()
                .map(|(k, _)| k.dim(2).unwrap_or(0))
                .max();
            return super::cuda::decode_attention::attend_table(
                q,
                table,
                kv_heads,
                capacity.unwrap_or(0),
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
