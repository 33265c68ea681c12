//! The adaptation loop: next-token cross-entropy on each pair's suffix (prefix masked), AdamW
//! with gradient accumulation and global-norm clipping, as in TTARAG. The pair encoding
//! (`examples.rs`), the loss (`loss.rs`), a step's gradients (`checkpoint.rs`) and full
//! scope's weight copy (`copy.rs`) are rooms of their own; clipping is the optimiser's.

use std::time::Instant;

use candle_core::{Result, Var};
use candle_nn::ParamsAdamW;
use serde::Serialize;

mod checkpoint;
mod copy;
mod examples;
mod loss;

use super::{Fallback, FastAdamW, Lora, LoraConfig, Pair, PairSource};
use crate::model::{Adapter, Decoder, ForwardOpts, Logits, Model, ModelError, WeightGrads};
pub(crate) use checkpoint::group_grads;
use checkpoint::*;
use copy::*;
pub use examples::{encode_pair, encode_pairs, Example};
pub(crate) use loss::logit_rows;
use loss::*;
pub use loss::{batch_loss, mean_loss, suffix_loss};

/// Settings of one adaptation, already validated and capped.
#[derive(Debug, Clone)]
pub struct TrainParams {
    pub lr: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub grad_accum: usize,
    pub clip_norm: f64,
    /// Optimiser steps; `None` = one pass over the pairs.
    pub steps: Option<usize>,
    pub max_tokens_per_pair: usize,
    /// Put the question before each prefix (the paper's formula) or not (its code).
    pub condition_on_query: bool,
    pub lora: LoraConfig,
    pub seed: u64,
    /// Stop taking steps once this much time has passed.
    pub time_budget_ms: Option<f64>,
    /// Rebuild each block's activations in the backward pass instead of keeping them all
    /// (one more forward; working memory of one block instead of every block).
    pub recompute: bool,
    /// Rebuild them on a GPU too (see [`TrainParams::rebuilds_on`]).
    pub recompute_on_gpu: bool,
    /// Off the CPU, score the pairs outside the first step's group in that step's forward
    /// pass (see [`TrainParams::scores_in_first_step`]).
    pub score_in_first_step: bool,
    /// Frozen-weight products in bf16 where the CPU has native bf16 dot products.
    pub bf16: bool,
    /// Checked before every optimiser step: a request whose client left, or whose deadline
    /// passed, stops adapting within one step (the error is a [`crate::cancel::Stopped`]).
    pub cancel: crate::cancel::Cancel,
}

impl TrainParams {
    /// Whether a step on `device` rebuilds activations: `recompute` on the CPU, and on a GPU
    /// only with `recompute_on_gpu`. A GPU keeps them: its memory holds a request's
    /// activations many times over, and a rebuild is one more forward pass of launches, which
    /// are what a GPU's training step spends its time on.
    pub fn rebuilds_on(&self, device: &candle_core::Device) -> bool {
        self.recompute && (device.is_cpu() || self.recompute_on_gpu)
    }

    /// Whether the loss before adaptation of the pairs outside the first step's group is
    /// taken in that step's forward pass (they ride in its batch, and their rows get no
    /// gradient) rather than in a pass of their own: off the CPU, with `score_in_first_step`.
    /// A GPU's pass costs launches, the same for a few more rows, so that is one pass fewer
    /// of the four a default adaptation runs; on the CPU a pass costs arithmetic, and those
    /// rows' share of the backward pass would be more than their forward pass alone.
    pub fn scores_in_first_step(&self, device: &candle_core::Device) -> bool {
        self.score_in_first_step && !device.is_cpu()
    }
}

/// What the adaptation did (the response's `rag.tta`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TtaReport {
    pub scope: &'static str,
    pub pairs: usize,
    pub pair_source: PairSource,
    /// Passages the pairs were cut from (`rag.tta.adapt_top_k` may exceed the prompt's).
    pub adapt_passages: usize,
    pub steps: usize,
    pub loss_before: Option<f64>,
    pub loss_after: Option<f64>,
    pub adapt_ms: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub optimizer_ms: f64,
    /// Why adaptation was skipped, cut short or discarded; `None` when it ran fully.
    pub fallback: Option<Fallback>,
}

impl TtaReport {
    /// Loss after minus loss before adaptation, when both were measured and finite: what the
    /// A/B summary and the metrics average.
    pub fn loss_delta(&self) -> Option<f64> {
        Some(self.loss_after? - self.loss_before?).filter(|d| d.is_finite())
    }
}

fn new_report(scope: &'static str, examples: &[Example], source: PairSource) -> TtaReport {
    TtaReport {
        scope,
        pairs: examples.len(),
        pair_source: source,
        adapt_passages: 0,
        steps: 0,
        loss_before: None,
        loss_after: None,
        adapt_ms: 0.0,
        forward_ms: 0.0,
        backward_ms: 0.0,
        optimizer_ms: 0.0,
        fallback: None,
    }
}

/// Trains `vars` (which `dec` and `adapter` read) on `examples`, measuring the suffix loss
/// before and after; with `merged`, the first step's forward pass also scores the pairs
/// outside its group ([`TrainParams::scores_in_first_step`]). Returns `false` when
/// adaptation must be discarded (non-finite loss).
#[allow(clippy::too_many_arguments)]
fn train(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    vars: &[Var],
    examples: &[Example],
    p: &TrainParams,
    report: &mut TtaReport,
    t0: Instant,
    merged: bool,
) -> Result<bool> {
    let accum = p.grad_accum.max(1);
    let steps = p.steps.unwrap_or(examples.len().div_ceil(accum));
    // The first step's forward scores pairs 0..accum on the unadapted model, which is what
    // loss_before needs of them (unless dropout changes that pass): only the other pairs get
    // a pass of their own here (a third of one at 3 pairs, accumulation 2).
    let dropout = adapter.is_some() && p.lora.dropout > 0.0;
    let first = if steps > 0 && !dropout && accum <= examples.len() {
        accum
    } else {
        0
    };
    if first == 0 {
        report.loss_before = Some(mean_loss_in(dec, adapter, examples, p.bf16)?);
    }
    // The others' loss: in the first step's pass where `merged`, else in a pass of their own.
    let rest: Vec<&Example> = match first {
        0 => vec![],
        _ => examples[first..].iter().collect(),
    };
    let merged = merged && !rest.is_empty();
    let rest_before = match rest.is_empty() || merged {
        true => 0.0,
        false => mean_loss_in(dec, adapter, &examples[first..], p.bf16)?,
    };
    let mut opt = FastAdamW::new(
        vars.to_vec(),
        ParamsAdamW {
            lr: p.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: p.eps,
            weight_decay: p.weight_decay,
        },
    )?;
    let mut next = 0usize;
    for _ in 0..steps {
        p.cancel.check().map_err(candle_core::Error::wrap)?;
        if let Some(budget) = p.time_budget_ms {
            if t0.elapsed().as_secs_f64() * 1e3 > budget {
                report.fallback = Some(Fallback::TimeBudget {
                    budget_ms: budget,
                    done: report.steps,
                    steps,
                });
                break;
            }
        }
        // In one-pass mode the last group may be smaller than `accum`.
        let size = if p.steps.is_none() {
            accum.min(examples.len() - next % examples.len())
        } else {
            accum
        };
        let group: Vec<&Example> = (0..size)
            .map(|i| &examples[(next + i) % examples.len()])
            .collect();
        next += group.len();
        if let Some(a) = adapter {
            a.begin_step(Some(p.seed.wrapping_add(report.steps as u64)));
        }
        let tf = Instant::now();
        let pass: Pass = if p.rebuilds_on(dec.device()) {
            checkpointed_grads
        } else {
            one_pass_grads
        };
        let scored = match merged && report.steps == 0 {
            true => rest.as_slice(),
            false => &[],
        };
        let step = pass(dec, adapter, vars, &group, scored, p.bf16)?;
        let (value, grads, fwd) = (step.loss, step.grads, step.forward_ms);
        report.forward_ms += fwd;
        report.backward_ms += tf.elapsed().as_secs_f64() * 1e3 - fwd;
        if report.steps == 0 && first > 0 {
            let n = examples.len() as f64;
            let rest_before = step.scored.unwrap_or(rest_before);
            report.loss_before =
                Some((value * first as f64 + rest_before * (n - first as f64)) / n);
        }
        if !value.is_finite() {
            report.fallback = Some(Fallback::NonFiniteLoss(value));
            return Ok(false);
        }
        let grads = vars
            .iter()
            .zip(grads)
            .map(|(v, g)| match g {
                Some(g) => Ok(g),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<Result<Vec<_>>>()?;
        let to = Instant::now();
        opt.step_clipped(&grads, p.clip_norm)?;
        report.optimizer_ms += to.elapsed().as_secs_f64() * 1e3;
        report.steps += 1;
    }
    if let Some(a) = adapter {
        a.begin_step(None);
    }
    if report.loss_before.is_none() {
        // The time budget stopped adaptation before its first step: the model is unadapted.
        report.loss_before = Some(mean_loss_in(dec, adapter, examples, p.bf16)?);
    }
    let after = mean_loss_in(dec, adapter, examples, p.bf16)?;
    report.loss_after = Some(after);
    if !after.is_finite() {
        report.fallback = Some(Fallback::Diverged);
        return Ok(false);
    }
    Ok(true)
}

/// Trains a fresh LoRA adapter on `examples`. Returns the adapter (or `None` when adaptation
/// was aborted: the caller then answers with the base model) and the report.
/// With `under` (a collection's domain adapter), the new adapter trains on top of it and
/// is meant to be used stacked on it ([`super::Stack`]); `under` itself is never written.
pub fn adapt_lora(
    dec: &Decoder,
    under: Option<&dyn Adapter>,
    examples: &[Example],
    source: PairSource,
    p: &TrainParams,
) -> Result<(Option<Lora>, TtaReport)> {
    let t0 = Instant::now();
    let mut report = new_report("lora", examples, source);
    if examples.is_empty() {
        report.fallback = Some(Fallback::NoPairs);
        return Ok((None, report));
    }
    let lora = Lora::new(dec.config(), &p.lora, p.seed, dec.device(), dec.dtype())?;
    let stack;
    let adapter: &dyn Adapter = match under {
        Some(under) => {
            stack = super::Stack { under, over: &lora };
            &stack
        }
        None => &lora,
    };
    let merged = p.scores_in_first_step(dec.device());
    let vars = lora.vars();
    let ok = train(
        dec,
        Some(adapter),
        &vars,
        examples,
        p,
        &mut report,
        t0,
        merged,
    )?;
    report.adapt_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok((ok.then_some(lora), report))
}

/// Trains every weight of a private copy of `dec` on `examples`. `dec` itself is never
/// written, so nothing is left to restore; the copy is dropped with the request.
pub fn adapt_full(
    dec: &Decoder,
    examples: &[Example],
    source: PairSource,
    p: &TrainParams,
) -> Result<(Option<Decoder>, TtaReport)> {
    let t0 = Instant::now();
    let mut report = new_report("full", examples, source);
    if examples.is_empty() {
        report.fallback = Some(Fallback::NoPairs);
        return Ok((None, report));
    }
    let mut vars = Vec::new();
    let mut weights = std::collections::HashMap::new();
    for (name, w) in dec.named_weights() {
        // A copy: the shared weights stay as they are.
        let v = trained_copy(&w)?;
        weights.insert(name, v.as_tensor().clone());
        vars.push(v);
    }
    let copy = Decoder::load(dec.config(), weights)?;
    let merged = p.scores_in_first_step(dec.device());
    let ok = train(&copy, None, &vars, examples, p, &mut report, t0, merged)?;
    report.adapt_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok((ok.then_some(copy), report))
}

#[cfg(test)]
mod tests;
