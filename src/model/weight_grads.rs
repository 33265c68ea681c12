//! Gradients of trained weights (full-scope adaptation), written by the few-row kernels
//! straight into one buffer per weight. candle's backward adds each op's gradient of a tensor
//! into a zero tensor of that tensor's size: a fresh allocation, a fill and an add per weight,
//! and for a tied embedding and head (113 MB for SmolLM2) a zero table, a scatter and an add
//! on top. Here the first contribution to a weight writes its buffer and later ones add to
//! it; the ops that deposit here return no weight gradient to candle.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor, TensorId};

use super::kernels::few_rows;

/// Weight gradients of one backward pass (or several, summed), by weight.
#[derive(Default)]
pub struct WeightGrads {
    bufs: Mutex<HashMap<TensorId, Vec<f32>>>,
}

impl WeightGrads {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds `g^T x` to the gradient of `w` `(n, k)`: `g` is `(m, n)`, `x` `(m, k)`.
    /// Requires [`few_rows::fits`]`(m)`.
    pub fn add_outer(&self, w: &Tensor, g: &[f32], x: &[f32], m: usize) -> Result<()> {
        let (n, k) = w.dims2()?;
        if g.len() != m * n || x.len() != m * k || !few_rows::fits(m) {
            candle_core::bail!("weight-grads: ({m}, {n}) by ({m}, {k}) does not fit");
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        match bufs.get_mut(&w.id()) {
            Some(dw) => few_rows::gt_x_add(g, x, m, n, k, dw),
            None => {
                bufs.insert(w.id(), few_rows::gt_x(g, x, m, n, k));
            }
        }
        Ok(())
    }

    /// Adds row `r` of `src` (`(ids.len(), k)`) to row `ids[r]` of the gradient of `w`: an
    /// embedding lookup's gradient.
    pub fn add_rows(&self, w: &Tensor, ids: &[u32], src: &[f32]) -> Result<()> {
        let (n, k) = w.dims2()?;
        if src.len() != ids.len() * k || ids.iter().any(|&i| i as usize >= n) {
            candle_core::bail!("weight-grads: {} rows into ({n}, {k})", ids.len());
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        let dw = bufs.entry(w.id()).or_insert_with(|| vec![0f32; n * k]);
        for (&i, row) in ids.iter().zip(src.chunks(k)) {
            let i = i as usize;
            dw[i * k..(i + 1) * k]
                .iter_mut()
                .zip(row)
                .for_each(|(d, s)| *d += s);
        }
        Ok(())
    }

    /// Removes and returns the gradient gathered for `w`, shaped like it.
    pub fn take(&self, w: &Tensor) -> Result<Option<Tensor>> {
        let buf = self
            .bufs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&w.id());
        buf.map(|b| Tensor::from_vec(b, w.shape(), w.device()))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn contributions_are_written_then_added_and_rows_scatter() -> Result<()> {
        if !few_rows::fits(3) {
            return Ok(()); // No AVX2 here: the kernels that fill it do not run either.
        }
        let dev = Device::Cpu;
        let (m, n, k) = (3, 5, 37);
        let w = Tensor::zeros((n, k), candle_core::DType::F32, &dev)?;
        let g = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let (gv, xv) = (
            g.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?,
        );
        let sink = WeightGrads::new();
        assert!(sink.take(&w)?.is_none());
        sink.add_outer(&w, &gv, &xv, m)?;
        sink.add_outer(&w, &gv, &xv, m)?;
        let rows = Tensor::randn(0f32, 1.0, (2, k), &dev)?;
        sink.add_rows(&w, &[4, 1], &rows.flatten_all()?.to_vec1::<f32>()?)?;
        let ids = Tensor::new(&[4u32, 1], &dev)?;
        let expected = ((g.t()?.matmul(&x)? * 2.0)?.index_add(&ids, &rows, 0))?;
        let got = sink.take(&w)?.expect("a gradient");
        let gap = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(gap < 1e-4, "gap {gap}");
        // Taken means gone: the next pass starts from nothing.
        assert!(sink.take(&w)?.is_none());
        assert!(sink.add_rows(&w, &[n as u32], &vec![0.0; k]).is_err());
        Ok(())
    }
}
