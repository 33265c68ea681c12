//! Weighted cross-entropy of a few rows through the output head, a vocabulary chunk at a
//! time: no `(rows, vocab)` logits (49,152 floats a row for SmolLM2) are ever held, and the
//! head's weight is read once in the forward pass and once in the backward pass whatever the
//! row count. candle has no fused linear cross-entropy, hence this op. A trained head (full
//! scope) gets its gradient through a [`WeightGrads`].

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

use super::few_rows::{self, Weight};
use crate::model::WeightGrads;

/// Vocabulary rows per chunk: `rows * VOCAB_CHUNK` floats of logits at a time (1 MB at 64 rows).
const VOCAB_CHUNK: usize = 4096;

struct HeadLoss {
    /// The head `(vocab, hidden)` as used: f32, or its bf16 copy.
    w: Tensor,
    targets: Vec<u32>,
    weights: Vec<f32>,
    /// Each row's log-sum-exp, kept by the forward pass for the backward pass.
    lse: Mutex<Option<Vec<f32>>>,
    /// Where the gradient of a trained head goes.
    sink: Option<Arc<WeightGrads>>,
}

/// Whether [`head_loss`] takes `rows` rows of input of `dtype` with the head `w`.
pub fn supported(rows: usize, dtype: DType, w: &Tensor) -> bool {
    w.device().is_cpu()
        && dtype == DType::F32
        && match w.dtype() {
            DType::BF16 => few_rows::fits_bf16(rows),
            DType::F32 => few_rows::fits(rows),
            _ => false,
        }
}

/// `sum_r weights[r] * -log softmax(h_r w^T)[targets[r]]` for `h` `(rows, hidden)`; `w` is
/// the head `(vocab, hidden)`, f32 or bf16 (then `h` is rounded to bf16 for the products).
/// Differentiable in `h`; with `sink`, the gradient of `w` is added there (a trained head).
/// Callers check [`supported`] first.
pub fn head_loss(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    weights: &[f64],
    sink: Option<&Arc<WeightGrads>>,
) -> Result<Tensor> {
    let rows = h.dim(0)?;
    let ok = h.rank() == 2 && h.device().is_cpu() && supported(rows, h.dtype(), w);
    if targets.len() != rows || weights.len() != rows || !ok {
        candle_core::bail!(
            "head-loss: {rows} rows, {} targets, unsupported input",
            targets.len()
        );
    }
    h.contiguous()?
        .apply_op1_arc(std::sync::Arc::new(Box::new(HeadLoss {
            w: w.contiguous()?,
            targets: targets.to_vec(),
            weights: weights.iter().map(|&x| x as f32).collect(),
            lse: Mutex::new(None),
            sink: sink.cloned(),
        })))
}

impl HeadLoss {
    /// Calls `f(v0, logits)` for each vocabulary chunk from `v0`, logits `(rows, chunk)`.
    fn chunks(&self, h: &[f32], rows: usize, mut f: impl FnMut(usize, &[f32])) -> Result<()> {
        let (vocab, k) = self.w.dims2()?;
        let done = Weight::of(&self.w, |w| {
            for v0 in (0..vocab).step_by(VOCAB_CHUNK) {
                let n = VOCAB_CHUNK.min(vocab - v0);
                f(v0, &w.rows(v0..v0 + n, k).x_wt(h, rows, k, n));
            }
        });
        done.ok_or_else(|| candle_core::Error::Msg("head-loss: head not on the CPU".into()))
    }

    /// Each row's log-sum-exp over the whole vocabulary, and its target's logit.
    fn lse_and_target(&self, h: &[f32], rows: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut max, mut sum) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
        let mut picked = vec![0f32; rows];
        self.chunks(h, rows, |v0, logits| {
            let n = logits.len() / rows;
            for r in 0..rows {
                let row = &logits[r * n..(r + 1) * n];
                let m = row.iter().copied().fold(max[r], f32::max);
                // Online log-sum-exp: rescale what was summed under the old maximum.
                sum[r] =
                    sum[r] * (max[r] - m).exp() + row.iter().map(|&z| (z - m).exp()).sum::<f32>();
                max[r] = m;
                let t = self.targets[r] as usize;
                if (v0..v0 + n).contains(&t) {
                    picked[r] = row[t - v0];
                }
            }
        })?;
        let lse = max.iter().zip(&sum).map(|(m, s)| m + s.ln()).collect();
        Ok((lse, picked))
    }
}

impl CustomOp1 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-loss"
    }

    fn cpu_fwd(&self, h: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(hv), Some((a, b))) = (h, l.contiguous_offsets()) else {
            candle_core::bail!("head-loss: needs a contiguous f32 input");
        };
        let rows = l.shape().dims()[0];
        let (lse, picked) = self.lse_and_target(&hv[a..b], rows)?;
        let loss: f32 = (0..rows)
            .map(|r| self.weights[r] * (lse[r] - picked[r]))
            .sum();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    /// `dh = grad * G w` with `G = sum_r weights[r] (softmax_r - onehot_r)`, a vocabulary
    /// chunk at a time; with a sink, also `dw += G^T h` (G whole: `rows * vocab` floats).
    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, k) = h.dims2()?;
        let vocab = self.w.dim(0)?;
        let h = h.contiguous()?;
        let (hs, hl) = h.storage_and_layout();
        let hv = match (&*hs, hl.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => &v[a..b],
            _ => candle_core::bail!("head-loss: backward needs a contiguous f32 CPU input"),
        };
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let cached = self.lse.lock().unwrap_or_else(|e| e.into_inner()).take();
        let lse = match cached {
            Some(lse) => lse,
            None => self.lse_and_target(hv, rows)?.0,
        };
        let mut whole = match self.sink {
            Some(_) => vec![0f32; rows * vocab],
            None => Vec::new(),
        };
        let mut dh = vec![0f32; rows * k];
        let mut err = None;
        self.chunks(hv, rows, |v0, logits| {
            let n = logits.len() / rows;
            let mut g = vec![0f32; rows * n];
            for r in 0..rows {
                let t = self.targets[r] as usize;
                let w = scale * self.weights[r];
                for (j, (d, &z)) in g[r * n..(r + 1) * n]
                    .iter_mut()
                    .zip(&logits[r * n..])
                    .enumerate()
                {
                    let onehot = if v0 + j == t { 1.0 } else { 0.0 };
                    *d = w * ((z - lse[r]).exp() - onehot);
                }
                if !whole.is_empty() {
                    whole[r * vocab + v0..r * vocab + v0 + n]
                        .copy_from_slice(&g[r * n..(r + 1) * n]);
                }
            }
            let part = Weight::of(&self.w, |w| w.rows(v0..v0 + n, k).g_w(&g, rows, n, k));
            match part {
                Some(p) => dh.iter_mut().zip(&p).for_each(|(a, b)| *a += b),
                None => err = Some("head-loss: head not on the CPU"),
            }
        })?;
        if let Some(e) = err {
            candle_core::bail!("{e}");
        }
        if let Some(sink) = &self.sink {
            sink.add_outer(&self.w, &whole, hv, rows)?;
        }
        Ok(Some(Tensor::from_vec(dh, (rows, k), h.device())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    #[test]
    fn matches_log_softmax_cross_entropy_and_its_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // A vocabulary over two chunks and a bit; targets in the first and last chunk.
        let (rows, k, vocab) = (5, 24, 2 * VOCAB_CHUNK + 37);
        let w = Tensor::randn(0f32, 1.0, (vocab, k), &dev)?;
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, k), &dev)?)?;
        if !supported(rows, DType::F32, &w) {
            return Ok(()); // No AVX2 here: callers keep the logits path.
        }
        let targets = [3u32, 4100, 8200, (vocab - 1) as u32, 0];
        let weights = [0.1, 0.2, 0.3, 0.25, 0.15];
        let fused = head_loss(h.as_tensor(), &w, &targets, &weights, None)?;
        let logits = h.as_tensor().matmul(&w.t()?)?;
        let logp = candle_nn::ops::log_softmax(&logits, 1)?;
        let t = Tensor::new(&targets, &dev)?.unsqueeze(1)?;
        let wt = Tensor::new(&weights.map(|x| x as f32), &dev)?;
        let plain = (logp.gather(&t, 1)?.squeeze(1)? * wt)?.sum_all()?.neg()?;
        let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        let g1 = (fused * 3.0)?.backward()?;
        let g2 = (plain * 3.0)?.backward()?;
        let d = (g1.get(h.as_tensor()).unwrap() - g2.get(h.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-4, "gradient gap {d}");
        Ok(())
    }

    #[test]
    fn a_trained_head_gets_its_gradient_through_the_sink() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, k, vocab) = (4, 40, 2 * VOCAB_CHUNK + 5);
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (vocab, k), &dev)?)?;
        let h = Tensor::randn(0f32, 1.0, (rows, k), &dev)?;
        if !supported(rows, DType::F32, w.as_tensor()) {
            return Ok(());
        }
        let targets = [vocab as u32 - 2, 1, 4097, 9];
        let weights = [0.4, 0.3, 0.2, 0.1];
        let sink = WeightGrads::new();
        let fused = head_loss(&h, w.as_tensor(), &targets, &weights, Some(&sink))?;
        // The op takes no gradient of its own for w: candle sees h only.
        let h = Var::from_tensor(&h)?;
        let fused_h = head_loss(
            h.as_tensor(),
            w.as_tensor(),
            &targets,
            &weights,
            Some(&sink),
        )?;
        assert!(sink.take(w.as_tensor())?.is_none());
        fused_h.backward()?;
        let ours = sink.take(w.as_tensor())?.expect("the head's gradient");
        let logp = candle_nn::ops::log_softmax(&h.as_tensor().matmul(&w.as_tensor().t()?)?, 1)?;
        let t = Tensor::new(&targets, &dev)?.unsqueeze(1)?;
        let wt = Tensor::new(&weights.map(|x| x as f32), &dev)?;
        let plain = (logp.gather(&t, 1)?.squeeze(1)? * wt)?.sum_all()?.neg()?;
        let (a, b) = (fused.to_scalar::<f32>()?, plain.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        let reference = plain.backward()?;
        let expected = reference.get(w.as_tensor()).expect("candle's gradient");
        let gap = (ours - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(gap < 1e-5, "head gradient gap {gap}");
        Ok(())
    }
}
