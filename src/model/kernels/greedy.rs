//! Each row's greedy token and its log-probability from a step's logits `(rows, vocab)`, in
//! one op and one copy to the host of two numbers per row. Picking a token and its
//! log-probability from a logits row on the host costs a copy of the whole row (the
//! vocabulary, ~49k floats) and a wait for the device per row and per use; on a GPU that is
//! what a decode step's sampling spends. The CPU body is the host formula the sampler and the
//! answer's log-probability always used, so a CPU answer keeps its bits; the CUDA body
//! (`cuda::greedy`) reduces each row in one block, in a fixed order.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

/// A row's greedy token and its log-probability (NaN where it was not asked for).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pick {
    pub token: u32,
    pub logprob: f64,
}

/// `log softmax(row)[id]`, in f64 over the f32 row (the answer's log-probability of a token).
pub fn logprob_at(row: &[f32], id: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.get(id)
        .map_or(f64::NEG_INFINITY, |&x| x as f64 - max - sum.ln())
}

/// The index of the row's largest value: the first of equals, as candle's `argmax` on the CPU
/// (which the sampler used) picks it.
fn argmax(row: &[f32]) -> usize {
    let mut at = 0;
    let mut best = row[0];
    for (i, &x) in row.iter().enumerate() {
        if best < x {
            at = i;
            best = x;
        }
    }
    at
}

/// Whether the op runs where `dev` holds the logits: on the CPU, and on a GPU with the
/// project's kernels on. Elsewhere the logits come to the host first (one copy for all rows).
fn runs_on(dev: &Device) -> bool {
    #[cfg(feature = "cuda")]
    if dev.is_cuda() {
        return super::cuda::enabled();
    }
    dev.is_cpu()
}

/// Each row's greedy pick from `logits` (`(rows, vocab)` or `(vocab,)`, f32 or bf16, on any
/// device). Without `logprobs` the CPU leaves each log-probability out (NaN): a row then
/// costs its argmax alone, where the f64 log-softmax over the vocabulary is about seven times that
/// (a GPU computes it in the same pass either way).
pub fn greedy_picks(logits: &Tensor, logprobs: bool) -> Result<Vec<Pick>> {
    let logits = match logits.rank() {
        1 => logits.unsqueeze(0)?,
        _ => logits.clone(),
    };
    let (_, vocab) = logits.dims2()?;
    if vocab == 0 {
        candle_core::bail!("greedy pick: an empty vocabulary");
    }
    let logits = match logits.dtype() {
        DType::F32 | DType::BF16 => logits,
        _ => logits.to_dtype(DType::F32)?,
    };
    let logits = match runs_on(logits.device()) {
        true => logits,
        false => logits.to_device(&Device::Cpu)?,
    };
    let out = logits
        .contiguous()?
        .apply_op1_no_bwd(&Greedy { logprobs })?;
    Ok(out
        .to_vec2::<f64>()?
        .into_iter()
        .map(|r| Pick {
            token: r[0] as u32,
            logprob: r[1],
        })
        .collect())
}

struct Greedy {
    logprobs: bool,
}

impl CustomOp1 for Greedy {
    fn name(&self) -> &'static str {
        "greedy-pick"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("greedy pick: contiguous logits only");
        };
        let (rows, vocab) = l.shape().dims2()?;
        let f32s: std::borrow::Cow<[f32]> = match s {
            CpuStorage::F32(v) => v[a..b].into(),
            CpuStorage::BF16(v) => v[a..b].iter().map(|x| x.to_f32()).collect(),
            _ => candle_core::bail!("greedy pick: f32 or bf16 logits"),
        };
        let mut out = Vec::with_capacity(2 * rows);
        for row in f32s.chunks_exact(vocab) {
            let id = argmax(row);
            let logprob = match self.logprobs {
                true => logprob_at(row, id),
                false => f64::NAN,
            };
            out.extend([id as f64, logprob]);
        }
        Ok((CpuStorage::F64(out), Shape::from((rows, 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = l.shape().dims2()?;
        let out = super::cuda::greedy::picks(s, l, rows, vocab)?;
        Ok((out, Shape::from((rows, 2))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;
    use candle_transformers::generation::{LogitsProcessor, Sampling};

    fn rows(rows: usize, vocab: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..rows * vocab)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 30.0
            })
            .collect()
    }

    /// The pick is the sampler's greedy token and the log-probability the answer always summed,
    /// bit for bit, for every row of a batch: a CPU answer is unchanged by taking it.
    #[test]
    fn picks_are_the_samplers_argmax_and_the_host_logprob_bit_for_bit() {
        let (n, vocab) = (5, 4099);
        let mut v = rows(n, vocab, 3);
        // Row 1: a tie for the largest value (the first wins); row 2: all equal.
        v[vocab + 10] = 50.0;
        v[vocab + 900] = 50.0;
        v[2 * vocab..3 * vocab].fill(-1.25);
        let t = Tensor::from_vec(v.clone(), (n, vocab), &Device::Cpu).unwrap();
        let picks = greedy_picks(&t, true).unwrap();
        assert_eq!(picks.len(), n);
        for (r, p) in picks.iter().enumerate() {
            let row = t.get(r).unwrap();
            let mut sampler = LogitsProcessor::from_sampling(0, Sampling::ArgMax);
            let want = sampler.sample(&row).unwrap();
            assert_eq!(p.token, want, "row {r}");
            let host = row.to_vec1::<f32>().unwrap();
            assert_eq!(
                p.logprob.to_bits(),
                logprob_at(&host, want as usize).to_bits()
            );
            let lsm = candle_nn::ops::log_softmax(&row.to_dtype(DType::F64).unwrap(), D::Minus1)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            assert!((p.logprob - lsm[want as usize]).abs() < 1e-9, "row {r}");
        }
        assert_eq!(picks[1].token, 10);
        assert_eq!(picks[2].token, 0);
        assert!((picks[2].logprob + (vocab as f64).ln()).abs() < 1e-9);
        // One row alone, and bf16 logits (read exactly as f32).
        assert_eq!(
            greedy_picks(&t.get(1).unwrap(), true).unwrap(),
            vec![picks[1]]
        );
        let b = t.to_dtype(DType::BF16).unwrap();
        let from_bf16 = greedy_picks(&b, true).unwrap();
        let via_f32 = greedy_picks(&b.to_dtype(DType::F32).unwrap(), true).unwrap();
        assert_eq!(from_bf16, via_f32);
        // Without log-probabilities: the same tokens, none of their log-probabilities.
        let tokens = greedy_picks(&t, false).unwrap();
        for (a, b) in picks.iter().zip(&tokens) {
            assert_eq!(a.token, b.token);
            assert!(b.logprob.is_nan());
        }
    }

    #[test]
    fn an_empty_vocabulary_is_an_error() {
        let t = Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap();
        assert!(greedy_picks(&t, true).is_err());
    }
}
