//! Likelihood of given continuations after a prompt: ranks fixed answer choices (yes/no/maybe)
//! by what the model believes rather than by what it happens to write, which measures small
//! models fairly.

use candle_core::{DType, Tensor, D};

use crate::model::{Adapter, Cache, Decoder, ForwardOpts, Logits};

/// Log-likelihood of one continuation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct ContinuationScore {
    /// Sum of the tokens' log-probabilities.
    pub logprob: f64,
    pub tokens: usize,
}

impl ContinuationScore {
    /// Per-token mean: choices of different token lengths stay comparable.
    pub fn mean(&self) -> f64 {
        if self.tokens == 0 {
            f64::NEG_INFINITY
        } else {
            self.logprob / self.tokens as f64
        }
    }
}

/// Scores each continuation after `prompt`. The prompt is run once; each continuation extends
/// a private copy of its KV cache.
pub fn score_continuations(
    dec: &Decoder,
    prompt: &[u32],
    continuations: &[Vec<u32>],
    adapter: Option<&dyn Adapter>,
) -> candle_core::Result<Vec<ContinuationScore>> {
    if prompt.is_empty() {
        candle_core::bail!("cannot score continuations of an empty prompt");
    }
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = dec.new_cache(prompt.len() + longest);
    let last = ForwardOpts {
        logits: Logits::Last,
        adapter,
        ..Default::default()
    };
    let ids = Tensor::new(prompt, dec.device())?.unsqueeze(0)?;
    let first = dec
        .forward(&ids, Some(&mut cache), &last)?
        .logits
        .expect("Logits::Last yields logits")
        .squeeze(0)?;
    score_after_prefill(dec, &cache, &first, continuations, adapter)
}

/// Scores continuations from a prompt that has already been run: `cache` holds the prompt and
/// `next_logits` (vocabulary-sized) are its last position's logits. Generation calls this
/// right after its own prefill, so scoring costs no second pass over the prompt.
pub fn score_after_prefill(
    dec: &Decoder,
    cache: &Cache,
    next_logits: &Tensor,
    continuations: &[Vec<u32>],
    adapter: Option<&dyn Adapter>,
) -> candle_core::Result<Vec<ContinuationScore>> {
    let device = dec.device();
    let first = candle_nn::ops::log_softmax(&next_logits.to_dtype(DType::F32)?, D::Minus1)?;
    let all = ForwardOpts {
        logits: Logits::All,
        adapter,
        ..Default::default()
    };
    continuations
        .iter()
        .map(|cont| {
            let Some(&head) = cont.first() else {
                return Ok(ContinuationScore {
                    logprob: 0.0,
                    tokens: 0,
                });
            };
            let mut logprob = first.get(head as usize)?.to_scalar::<f32>()? as f64;
            if cont.len() > 1 {
                // Position i of the continuation predicts token i + 1.
                let mut fork = cache.fork(cont.len())?;
                let ids = Tensor::new(&cont[..cont.len() - 1], device)?.unsqueeze(0)?;
                let logits = dec
                    .forward(&ids, Some(&mut fork), &all)?
                    .logits
                    .expect("Logits::All yields logits")
                    .squeeze(0)?
                    .to_dtype(DType::F32)?;
                let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                let targets = Tensor::new(&cont[1..], device)?.unsqueeze(1)?;
                let picked = lp.gather(&targets, 1)?.sum_all()?.to_scalar::<f32>()?;
                logprob += picked as f64;
            }
            Ok(ContinuationScore {
                logprob,
                tokens: cont.len(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::tiny_model;

    /// Log-probabilities read off one uncached forward over prompt + continuation.
    fn reference(dec: &Decoder, prompt: &[u32], cont: &[u32]) -> f64 {
        let mut all = prompt.to_vec();
        all.extend_from_slice(cont);
        let ids = Tensor::new(all.as_slice(), dec.device())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let opts = ForwardOpts {
            logits: Logits::All,
            ..Default::default()
        };
        let logits = dec.forward(&ids, None, &opts).unwrap().logits.unwrap();
        let lp = candle_nn::ops::log_softmax(&logits.squeeze(0).unwrap(), D::Minus1)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        cont.iter()
            .enumerate()
            .map(|(i, &tok)| lp[prompt.len() + i - 1][tok as usize])
            .sum()
    }

    #[test]
    fn matches_an_uncached_forward_and_forks_do_not_interfere() {
        let model = tiny_model(1).unwrap();
        let dec = &model.decoder;
        let prompt = [3u32, 17, 5, 9, 11];
        let conts = vec![vec![4u32, 8, 15], vec![16u32], vec![23u32, 42], vec![]];
        let got = score_continuations(dec, &prompt, &conts, None).unwrap();
        assert_eq!(got.len(), 4);
        for (c, s) in conts.iter().zip(&got).take(3) {
            let want = reference(dec, &prompt, c);
            assert!(
                (s.logprob - want).abs() < 1e-3,
                "{c:?}: {} vs {want}",
                s.logprob
            );
            assert_eq!(s.tokens, c.len());
            assert!(s.logprob < 0.0);
        }
        assert_eq!(got[3].tokens, 0);
        assert_eq!(got[3].mean(), f64::NEG_INFINITY);
        // Scoring the third alone gives the same number: earlier forks left no trace.
        let alone = score_continuations(dec, &prompt, &conts[2..3], None).unwrap();
        assert!((alone[0].logprob - got[2].logprob).abs() < 1e-6);
    }

    #[test]
    fn empty_prompt_is_an_error() {
        let model = tiny_model(1).unwrap();
        assert!(score_continuations(&model.decoder, &[], &[vec![1]], None).is_err());
    }
}
