//! One sequence's decoding state: sampler, stop strings, detokenizer, token budget and the
//! answer's log-probability. It turns each step's logits into text to show and the next
//! token, and knows when the answer is over; it never runs the model. The one-sequence loop
//! ([`super::generate_scoring`]) and the engine's batched scheduler drive the same state, so
//! an answer ends the same way whichever runs it.

use candle_core::{DType, Tensor};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use super::{FinishReason, GenError, GenParams, StopMatcher, StopStep};
use crate::model::{greedy_picks, logprob_at, IncrementalDecoder, Model, Pick};

/// What one step gave.
#[derive(Debug)]
pub enum Next {
    /// Show `text` (may be empty) and feed `token` to the model for the next logits.
    Token { token: u32, text: String },
    /// The answer is over: show `text` (may be empty) and stop.
    Finished { text: String },
}

/// Decoding state of one sequence.
pub struct Decoding {
    sampler: LogitsProcessor,
    /// Temperature 0: the sampler is an argmax, which [`greedy_picks`] computes as it would.
    greedy: bool,
    stops: StopMatcher,
    detok: IncrementalDecoder,
    budget: usize,
    produced: usize,
    /// Whether the answer's log-probability is summed (see [`Self::without_logprobs`]).
    logprobs: bool,
    logprob_sum: f64,
    text: String,
    finish: FinishReason,
}

fn sampler(p: &GenParams) -> LogitsProcessor {
    let sampling = if p.temperature <= 0.0 {
        Sampling::ArgMax
    } else if p.top_p < 1.0 {
        Sampling::TopP {
            p: p.top_p,
            temperature: p.temperature,
        }
    } else {
        Sampling::All {
            temperature: p.temperature,
        }
    };
    LogitsProcessor::from_sampling(p.seed, sampling)
}

impl Decoding {
    /// Checks the prompt against the model's `context` and sets the token budget: what
    /// `params.max_tokens` asks, never past the context.
    pub fn new(params: &GenParams, prompt_len: usize, context: usize) -> Result<Self, GenError> {
        if prompt_len == 0 {
            return Err(GenError::EmptyPrompt);
        }
        if prompt_len >= context {
            return Err(GenError::ContextExceeded {
                prompt: prompt_len,
                context,
            });
        }
        Ok(Self {
            sampler: sampler(params),
            greedy: params.temperature <= 0.0,
            stops: StopMatcher::new(&params.stop),
            detok: IncrementalDecoder::new(),
            budget: params.max_tokens.min(context - prompt_len),
            produced: 0,
            logprobs: true,
            logprob_sum: 0.0,
            text: String::new(),
            finish: FinishReason::Length,
        })
    }

    /// The same decoding without the answer's log-probability, for a caller that never reads
    /// it ([`Self::logprob_sum`] stays 0): a greedy row on the CPU then costs its argmax, not
    /// the log-softmax over the vocabulary beside it.
    pub fn without_logprobs(mut self) -> Self {
        self.logprobs = false;
        self
    }

    /// Whether the answer's log-probability is summed.
    pub fn logprobs(&self) -> bool {
        self.logprobs
    }

    /// Most tokens this answer may produce: the KV cache needs room for them.
    pub fn budget(&self) -> usize {
        self.budget
    }

    pub fn produced(&self) -> usize {
        self.produced
    }

    /// The answer so far (all text returned by [`Self::step`]).
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn finish_reason(&self) -> FinishReason {
        self.finish
    }

    /// Sum of the produced tokens' log-probabilities (an end-of-turn token included); 0
    /// [`Self::without_logprobs`].
    pub fn logprob_sum(&self) -> f64 {
        self.logprob_sum
    }

    /// Whether the next token is the most likely one (temperature 0): a batch may then pick
    /// it for every such row at once ([`greedy_picks`]) and hand it to [`Self::step_picked`].
    pub fn greedy(&self) -> bool {
        self.greedy
    }

    /// Samples the next token from `logits` (vocabulary-sized) and says what to show.
    pub fn step(&mut self, model: &Model, logits: &Tensor) -> Result<Next, GenError> {
        if let Some(end) = self.spent(model)? {
            return Ok(end);
        }
        let pick = if self.greedy {
            // One small copy from the device instead of the row, twice.
            greedy_picks(logits, self.logprobs)?[0]
        } else {
            self.sample(&logits.to_dtype(DType::F32)?.to_vec1::<f32>()?)?
        };
        self.step_picked(model, pick)
    }

    /// [`Self::step`] for a sampled row whose logits are on the host already (one copy for
    /// a batch's sampled rows).
    pub fn step_sampled(&mut self, model: &Model, logits: &[f32]) -> Result<Next, GenError> {
        if let Some(end) = self.spent(model)? {
            return Ok(end);
        }
        let pick = self.sample(logits)?;
        self.step_picked(model, pick)
    }

    /// A token sampled from `logits` on the host and its log-probability: the row is copied
    /// from the device once, for both (the sampler would copy it, and the log-probability
    /// again). On the CPU the sampler's ops are the same as on the logits themselves.
    fn sample(&mut self, logits: &[f32]) -> Result<Pick, GenError> {
        let row = Tensor::from_slice(logits, logits.len(), &candle_core::Device::Cpu)?;
        let token = self.sampler.sample(&row)?;
        let logprob = match self.logprobs {
            true => logprob_at(logits, token as usize),
            false => f64::NAN,
        };
        Ok(Pick { token, logprob })
    }

    /// Takes `pick` (this row's [`greedy_picks`], or a sampled token and its log-probability)
    /// as the next token and says what to show.
    pub fn step_picked(&mut self, model: &Model, pick: Pick) -> Result<Next, GenError> {
        if let Some(end) = self.spent(model)? {
            return Ok(end);
        }
        let next = pick.token;
        self.produced += 1;
        if self.logprobs {
            self.logprob_sum += pick.logprob;
        }
        if model.eos_ids.contains(&next) {
            self.finish = FinishReason::Stop;
            let text = self.close(model)?;
            return Ok(Next::Finished { text });
        }
        let piece = self.detok.push(&model.tokenizer, next)?;
        match self.stops.push(&piece) {
            StopStep::Stopped(t) => {
                self.finish = FinishReason::Stop;
                self.text.push_str(&t);
                Ok(Next::Finished { text: t })
            }
            StopStep::Emit(mut t) => {
                self.text.push_str(&t);
                if self.produced == self.budget {
                    t.push_str(&self.close(model)?);
                    return Ok(Next::Finished { text: t });
                }
                Ok(Next::Token {
                    token: next,
                    text: t,
                })
            }
        }
    }

    /// The answer's end where it has no token left to produce (nothing is picked then).
    fn spent(&mut self, model: &Model) -> Result<Option<Next>, GenError> {
        if self.budget != 0 {
            return Ok(None);
        }
        let text = self.close(model)?;
        Ok(Some(Next::Finished { text }))
    }

    /// Releases what the detokenizer and the stop matcher still hold.
    fn close(&mut self, model: &Model) -> Result<String, GenError> {
        let rest = self.detok.finish(&model.tokenizer)?;
        let tail = match self.stops.push(&rest) {
            StopStep::Emit(t) => t + &self.stops.flush(),
            StopStep::Stopped(t) => {
                self.finish = FinishReason::Stop;
                t
            }
        };
        self.text.push_str(&tail);
        Ok(tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sampled row picks the token the sampler picks from the logits tensor itself, with
    /// the log-probability of that token in the row: one host copy changes no bits.
    #[test]
    fn sampling_from_the_host_row_is_sampling_from_the_logits() {
        let vocab = 1_007;
        let logits: Vec<f32> = (0..vocab)
            .map(|i| ((i * 7919 % 1_009) as f32 / 97.0).sin() * 4.0)
            .collect();
        for (temperature, top_p) in [(0.9, 1.0), (0.7, 0.9), (1.3, 0.5)] {
            let params = GenParams {
                temperature,
                top_p,
                seed: 11,
                max_tokens: 8,
                stop: vec![],
            };
            let mut ours = Decoding::new(&params, 4, 64).unwrap();
            let mut theirs = sampler(&params);
            let t = Tensor::new(logits.as_slice(), &candle_core::Device::Cpu).unwrap();
            let mut tokens = std::collections::BTreeSet::new();
            for _ in 0..40 {
                let pick = ours.sample(&logits).unwrap();
                assert_eq!(pick.token, theirs.sample(&t).unwrap());
                assert_eq!(pick.logprob, logprob_at(&logits, pick.token as usize));
                tokens.insert(pick.token);
            }
            assert!(
                tokens.len() > 1,
                "the draws should differ ({temperature}, {top_p})"
            );
        }
    }

    /// Without log-probabilities an answer is the same text, greedy or sampled: only the sum
    /// is left out.
    #[test]
    fn an_answer_without_log_probabilities_is_the_same_answer() {
        let model = crate::model::tiny::tiny_model(1).unwrap();
        let vocab = model.decoder.config().vocab_size;
        for temperature in [0.0, 0.9] {
            let params = GenParams {
                temperature,
                top_p: 1.0,
                seed: 5,
                max_tokens: 12,
                stop: vec![],
            };
            let mut with = Decoding::new(&params, 4, 64).unwrap();
            let mut without = Decoding::new(&params, 4, 64).unwrap().without_logprobs();
            assert!(with.logprobs() && !without.logprobs());
            for step in 0..12u64 {
                let row: Vec<f32> = (0..vocab)
                    .map(|i| ((i as u64 * 31 + step * 17) % 97) as f32 / 9.0)
                    .collect();
                let t = Tensor::new(row.as_slice(), &candle_core::Device::Cpu).unwrap();
                let (a, b) = (
                    with.step(&model, &t).unwrap(),
                    without.step(&model, &t).unwrap(),
                );
                assert_eq!(format!("{a:?}"), format!("{b:?}"), "step {step}");
                if matches!(a, Next::Finished { .. }) {
                    break;
                }
            }
            assert_eq!(with.text(), without.text());
            assert!(with.logprob_sum() < 0.0 && without.logprob_sum() == 0.0);
        }
    }
}
