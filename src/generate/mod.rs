//! Autoregressive generation: prefill, KV-cached decode, sampling, stop strings, token budget.

mod decoding;
mod score;
mod stop;

use std::time::Instant;

use candle_core::{Device, Tensor};

pub use decoding::{Decoding, Next};
pub use score::{score_after_prefill, score_continuations, ContinuationScore};
pub use stop::{StopMatcher, StopStep};

use crate::cancel::{Cancel, Stopped};
use crate::model::{Adapter, Cache, Decoder, ForwardOpts, Logits, Model, ModelError, StepGraph};

/// Prompt tokens per prefill pass: a cancelled or timed-out request stops within one chunk.
/// Prompts up to this length are one pass, as before chunking.
pub const PREFILL_CHUNK: usize = 512;

/// Decoding parameters, already validated.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    pub seed: u64,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

/// Result and timings of one generation.
#[derive(Debug, Clone)]
pub struct GenOutput {
    pub text: String,
    pub completion_tokens: usize,
    /// Sum of the log-probabilities of the tokens produced (an end-of-turn token included),
    /// under the model that produced them: its confidence in the answer.
    pub logprob_sum: f64,
    pub finish_reason: FinishReason,
    pub prefill_ms: f64,
    pub decode_ms: f64,
}

/// Why generation could not run.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("prompt of {prompt} tokens leaves no room in the model's context of {context} tokens")]
    ContextExceeded { prompt: usize, context: usize },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("generation cancelled")]
    Cancelled,
    #[error(transparent)]
    Stopped(#[from] Stopped),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Runs `prompt` into `cache` `chunk` tokens at a time, checking `cancel` before each pass;
/// returns the last position's logits.
pub fn prefill(
    dec: &Decoder,
    prompt: &[u32],
    cache: &mut Cache,
    opts: &ForwardOpts,
    chunk: usize,
    cancel: &Cancel,
) -> Result<Tensor, GenError> {
    let chunks: Vec<&[u32]> = prompt.chunks(chunk.max(1)).collect();
    let Some((last, head)) = chunks.split_last() else {
        return Err(GenError::EmptyPrompt);
    };
    let quiet = ForwardOpts {
        logits: Logits::None,
        ..*opts
    };
    for c in head {
        cancel.check()?;
        let ids = Tensor::new(*c, dec.device())?.unsqueeze(0)?;
        dec.forward(&ids, Some(cache), &quiet)?;
    }
    cancel.check()?;
    let ids = Tensor::new(*last, dec.device())?.unsqueeze(0)?;
    Ok(dec
        .forward(&ids, Some(cache), opts)?
        .logits
        .ok_or(GenError::EmptyPrompt)?
        .squeeze(0)?)
}

impl GenOutput {
    /// Mean log-probability per produced token.
    pub fn mean_logprob(&self) -> f64 {
        self.logprob_sum / self.completion_tokens.max(1) as f64
    }
}

/// Generates from `prompt`, calling `on_text` with each piece of safe-to-show text. `on_text`
/// returns `false` when the consumer has gone, which cancels generation.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    params: &GenParams,
    adapter: Option<&dyn Adapter>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenOutput, GenError> {
    generate_with(model, &model.decoder, prompt, params, adapter, on_text)
}

/// [`generate`] with another decoder (e.g. a request's fully adapted copy) in place of the
/// model's own; tokenizer and stop ids still come from `model`.
pub fn generate_with(
    model: &Model,
    dec: &Decoder,
    prompt: &[u32],
    params: &GenParams,
    adapter: Option<&dyn Adapter>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenOutput, GenError> {
    let never = Cancel::default();
    generate_scoring(
        model,
        dec,
        prompt,
        params,
        adapter,
        &[],
        Passes {
            chunk: PREFILL_CHUNK,
            step_graphs: dec.replays_steps(),
        },
        &never,
        on_text,
    )
    .map(|(out, _)| out)
}

/// How a generation runs its passes.
#[derive(Debug, Clone, Copy)]
pub struct Passes {
    /// Prompt tokens per prefill pass.
    pub chunk: usize,
    /// Decode steps through a [`StepGraph`] (captured once and replayed on a GPU; on the CPU
    /// the same ops, with the bits of plain steps) where the decoder serves one.
    pub step_graphs: bool,
}

/// [`generate_with`] that also scores `continuations` (token ids) after the prompt, from the
/// prompt's own prefill: no second pass over it. Scoring time counts in neither prefill nor
/// decode. The prompt runs `passes.chunk` tokens a pass; `cancel` is checked before each
/// prefill chunk and each decode step.
#[allow(clippy::too_many_arguments)]
pub fn generate_scoring(
    model: &Model,
    dec: &Decoder,
    prompt: &[u32],
    params: &GenParams,
    adapter: Option<&dyn Adapter>,
    continuations: &[Vec<u32>],
    passes: Passes,
    cancel: &Cancel,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<(GenOutput, Vec<ContinuationScore>), GenError> {
    let mut decoding = Decoding::new(params, prompt.len(), dec.config().max_position_embeddings)?;
    let device: &Device = dec.device();
    let capacity = prompt.len() + decoding.budget();
    let mut cache = dec.new_cache(capacity);
    let opts = ForwardOpts {
        logits: Logits::Last,
        adapter,
        ..Default::default()
    };

    let t0 = Instant::now();
    let mut logits = prefill(dec, prompt, &mut cache, &opts, passes.chunk, cancel)?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let scores = if continuations.is_empty() {
        vec![]
    } else {
        score_after_prefill(dec, &cache, &logits, continuations, adapter)?
    };
    let t1 = Instant::now();
    let mut steps = match passes.step_graphs && dec.device_steps_serve(capacity) {
        true => Some(StepGraph::new(dec, &mut [&mut cache], 1)?),
        false => None,
    };
    loop {
        let (token, text) = match decoding.step(model, &logits)? {
            Next::Token { token, text } => (token, text),
            Next::Finished { text } => {
                if !text.is_empty() && !on_text(&text) {
                    return Err(GenError::Cancelled);
                }
                break;
            }
        };
        if !text.is_empty() && !on_text(&text) {
            return Err(GenError::Cancelled);
        }
        cancel.check()?;
        logits = match &mut steps {
            Some(g) => g
                .step(dec, &[token], &mut [&mut cache], &[adapter])?
                .0
                .squeeze(0)?,
            None => {
                let ids = Tensor::new(&[token], device)?.unsqueeze(0)?;
                dec.forward(&ids, Some(&mut cache), &opts)?
                    .logits
                    .ok_or(GenError::EmptyPrompt)?
                    .squeeze(0)?
            }
        };
    }
    let out = GenOutput {
        text: decoding.text().to_string(),
        completion_tokens: decoding.produced(),
        logprob_sum: decoding.logprob_sum(),
        finish_reason: decoding.finish_reason(),
        prefill_ms,
        decode_ms: t1.elapsed().as_secs_f64() * 1e3,
    };
    Ok((out, scores))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tiny::tiny_model;

    fn params(temperature: f64, seed: u64, max_tokens: usize) -> GenParams {
        GenParams {
            max_tokens,
            temperature,
            top_p: 1.0,
            seed,
            stop: vec![],
        }
    }

    fn run(model: &Model, p: &GenParams) -> GenOutput {
        let prompt = model
            .tokenizer
            .encode("<|im_start|>user\nhello<|im_end|>\n")
            .unwrap();
        let mut streamed = String::new();
        let out = generate(model, &prompt, p, None, &mut |t| {
            streamed.push_str(t);
            true
        })
        .unwrap();
        assert_eq!(
            streamed, out.text,
            "streamed pieces must add up to the answer"
        );
        out
    }

    #[test]
    fn scoring_during_generation_matches_scoring_alone_and_leaves_the_answer_alone() {
        let mut m = tiny_model(1).unwrap();
        m.eos_ids.clear();
        let prompt = m
            .tokenizer
            .encode("<|im_start|>user\nhello<|im_end|>\n")
            .unwrap();
        let conts = vec![vec![4u32, 8, 15], vec![16u32], vec![]];
        let p = params(0.0, 0, 12);
        let (out, scores) = generate_scoring(
            &m,
            &m.decoder,
            &prompt,
            &p,
            None,
            &conts,
            Passes {
                chunk: PREFILL_CHUNK,
                step_graphs: false,
            },
            &Cancel::default(),
            &mut |_| true,
        )
        .unwrap();
        let alone = score_continuations(&m.decoder, &prompt, &conts, None).unwrap();
        assert_eq!(scores.len(), 3);
        for (a, b) in scores.iter().zip(&alone) {
            assert_eq!(a.tokens, b.tokens);
            assert!((a.logprob - b.logprob).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        // The forks used for scoring must not disturb the cache that decoding goes on with.
        assert_eq!(out.text, run(&m, &p).text);
        assert_eq!(out.completion_tokens, 12);
    }

    /// Decoding through a step graph gives the answer and log-probability of plain steps,
    /// greedy and sampled, with an adapter and with scoring from the same prefill.
    #[test]
    fn step_graphs_decode_the_same_answer_as_plain_steps() {
        let mut m = tiny_model(1).unwrap();
        m.eos_ids.clear();
        let prompt = m
            .tokenizer
            .encode("<|im_start|>user\nwhy is the sky blue<|im_end|>\n")
            .unwrap();
        let lora = crate::adapt::Lora::new(
            m.decoder.config(),
            &crate::adapt::LoraConfig::default(),
            3,
            m.decoder.device(),
            m.decoder.dtype(),
        )
        .unwrap();
        // A fresh LoRA's B is zero: give it a real delta.
        for v in lora.vars() {
            v.set(&v.randn_like(0.0, 0.2).unwrap()).unwrap();
        }
        let conts = vec![vec![4u32, 8, 15]];
        for (p, adapter) in [
            (params(0.0, 0, 16), None),
            (params(0.9, 5, 16), None),
            (params(0.0, 0, 16), Some(&lora as &dyn Adapter)),
        ] {
            let gen = |step_graphs| {
                let passes = Passes {
                    chunk: 5,
                    step_graphs,
                };
                generate_scoring(
                    &m,
                    &m.decoder,
                    &prompt,
                    &p,
                    adapter,
                    &conts,
                    passes,
                    &Cancel::default(),
                    &mut |_| true,
                )
                .unwrap()
            };
            let ((plain, s1), (graphed, s2)) = (gen(false), gen(true));
            assert_eq!(plain.text, graphed.text);
            assert_eq!(plain.completion_tokens, 16);
            assert_eq!(plain.logprob_sum, graphed.logprob_sum);
            assert_eq!(s1[0].logprob, s2[0].logprob);
        }
    }

    #[test]
    fn the_answers_log_probability_is_that_of_its_tokens_scored_after_the_prompt() {
        let mut m = tiny_model(1).unwrap();
        m.eos_ids.clear();
        let prompt = m
            .tokenizer
            .encode("<|im_start|>user\nhello<|im_end|>\n")
            .unwrap();
        // Greedy: the answer's tokens are the argmax path, which re-encoding its text might
        // not reproduce; collect them through a one-token budget at a time instead.
        let p = params(0.0, 0, 6);
        let out = generate(&m, &prompt, &p, None, &mut |_| true).unwrap();
        let mut ids = prompt.clone();
        let mut tokens = vec![];
        for _ in 0..6 {
            let logits = prefill(
                &m.decoder,
                &ids,
                &mut m.decoder.new_cache(ids.len()),
                &ForwardOpts {
                    logits: Logits::Last,
                    ..Default::default()
                },
                PREFILL_CHUNK,
                &Cancel::default(),
            )
            .unwrap();
            let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            tokens.push(next);
            ids.push(next);
        }
        let scored = score_continuations(&m.decoder, &prompt, &[tokens], None).unwrap();
        assert!(out.logprob_sum < 0.0);
        assert!(
            (out.logprob_sum - scored[0].logprob).abs() < 1e-3,
            "{} vs {:?}",
            out.logprob_sum,
            scored[0]
        );
        assert!((out.mean_logprob() - out.logprob_sum / 6.0).abs() < 1e-12);
    }

    #[test]
    fn sampling_is_deterministic_given_a_seed() {
        let mut m = tiny_model(1).unwrap();
        m.eos_ids.clear();
        let a = run(&m, &params(1.0, 42, 40));
        let b = run(&m, &params(1.0, 42, 40));
        assert_eq!(a.text, b.text);
        let others: Vec<String> = (0..4).map(|s| run(&m, &params(1.0, s, 40)).text).collect();
        assert!(others.iter().any(|t| t != &a.text), "seeds must matter");
        assert_eq!(
            run(&m, &params(0.0, 1, 40)).text,
            run(&m, &params(0.0, 2, 40)).text
        );
    }

    #[test]
    fn budget_and_stop_strings_end_generation() {
        let mut m = tiny_model(1).unwrap();
        m.eos_ids.clear();
        let full = run(&m, &params(0.0, 0, 30));
        assert_eq!(full.completion_tokens, 30);
        assert_eq!(full.finish_reason, FinishReason::Length);
        // Stop on a piece of the greedy answer: the output is what came before it.
        let chars: Vec<char> = full.text.chars().collect();
        let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
        let mut p = params(0.0, 0, 30);
        p.stop = vec![stop.clone()];
        let cut = run(&m, &p);
        assert_eq!(cut.finish_reason, FinishReason::Stop);
        assert!(full.text.starts_with(&cut.text));
        assert!(!cut.text.contains(&stop));
    }

    #[test]
    fn chunked_prefill_matches_one_pass_and_stops_when_cancelled() {
        let m = tiny_model(1).unwrap();
        let prompt: Vec<u32> = m
            .tokenizer
            .encode("a prompt long enough to span several chunks of seven tokens")
            .unwrap();
        let opts = ForwardOpts::default();
        let never = Cancel::default();
        let logits = |chunk| {
            let mut cache = m.decoder.new_cache(prompt.len());
            let l = prefill(&m.decoder, &prompt, &mut cache, &opts, chunk, &never).unwrap();
            (l.to_vec1::<f32>().unwrap(), cache)
        };
        let (whole, _) = logits(usize::MAX);
        let (chunked, cache) = logits(7);
        assert_eq!(cache.len(), prompt.len());
        let diff = whole
            .iter()
            .zip(&chunked)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "chunked prefill differs by {diff}");

        let cancelled = Cancel::new(None);
        cancelled.cancel();
        let mut cache = m.decoder.new_cache(prompt.len());
        let err = prefill(&m.decoder, &prompt, &mut cache, &opts, 7, &cancelled).unwrap_err();
        assert!(
            matches!(err, GenError::Stopped(Stopped::Cancelled)),
            "{err}"
        );
        assert_eq!(cache.len(), 0, "no chunk may run once cancelled");

        let late = Cancel::new(Some(Instant::now()));
        let err = generate_scoring(
            &m,
            &m.decoder,
            &prompt,
            &params(0.0, 0, 5),
            None,
            &[],
            Passes {
                chunk: PREFILL_CHUNK,
                step_graphs: false,
            },
            &late,
            &mut |_| true,
        )
        .unwrap_err();
        assert!(
            matches!(err, GenError::Stopped(Stopped::DeadlineExceeded)),
            "{err}"
        );
    }

    #[test]
    fn cancelled_consumer_stops_generation_and_long_prompt_is_refused() {
        let mut m = tiny_model(1).unwrap();
        m.eos_ids.clear();
        let prompt = m.tokenizer.encode("hello").unwrap();
        let err = generate(&m, &prompt, &params(0.0, 0, 50), None, &mut |_| false).unwrap_err();
        assert!(matches!(err, GenError::Cancelled));
        let long = vec![5u32; 600];
        let err = generate(&m, &long, &params(0.0, 0, 5), None, &mut |_| true).unwrap_err();
        assert!(matches!(err, GenError::ContextExceeded { .. }), "{err}");
    }
}
