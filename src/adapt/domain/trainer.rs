//! Offline training of a collection's domain adapter (`ttarag index adapt`): one LoRA over
//! ready-made examples (labelled questions with their retrieved passages, and/or corpus
//! text), with the request path's own training step, seeded shuffles, and checkpoints from
//! which a killed run resumes to the very same weights.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::ParamsAdamW;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::adapt::train::group_grads;
use crate::adapt::{parse_target, Example, FastAdamW, Lora, LoraConfig};
use crate::model::{Adapter, Decoder};

/// `[domain.train]`: how `ttarag index adapt` trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainTrain {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<String>,
    pub dropout: f64,
    pub epochs: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Examples per optimiser step.
    pub batch: usize,
    pub clip_norm: f64,
    pub seed: u64,
    /// Longest example in tokens; longer ones are left out (and counted).
    pub max_tokens: usize,
    /// Corpus passages trained on as plain text (next-token loss), per labelled question;
    /// without `--questions`, every passage is.
    pub corpus_per_question: f64,
    /// Share of labelled examples whose passages are replaced by random ones (RAFT's
    /// distractor-only examples: the answer must then come from the model itself).
    pub distractor_share: f64,
    pub recompute_activations: bool,
    pub bf16_products: bool,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
}

impl DomainTrain {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=256).contains(&self.rank),
            "domain.train.rank {} is outside 1..=256",
            self.rank
        );
        ensure!(self.alpha > 0.0, "domain.train.alpha must be positive");
        ensure!(
            !self.targets.is_empty(),
            "domain.train.targets must name at least one projection"
        );
        for t in &self.targets {
            ensure!(
                parse_target(t).is_some(),
                "domain.train.targets: `{t}` is not one of q, k, v, o, gate, up, down"
            );
        }
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "domain.train.dropout is outside [0, 1)"
        );
        ensure!(
            (1..=100).contains(&self.epochs),
            "domain.train.epochs is outside 1..=100"
        );
        ensure!(
            self.lr > 0.0 && self.lr <= 1.0,
            "domain.train.lr {} is outside (0, 1]",
            self.lr
        );
        ensure!(
            (1..=1024).contains(&self.batch),
            "domain.train.batch is outside 1..=1024"
        );
        ensure!(
            self.max_tokens >= 16,
            "domain.train.max_tokens must be at least 16"
        );
        ensure!(
            (0.0..=100.0).contains(&self.corpus_per_question),
            "domain.train.corpus_per_question is outside [0, 100]"
        );
        ensure!(
            (0.0..=1.0).contains(&self.distractor_share),
            "domain.train.distractor_share is outside [0, 1]"
        );
        ensure!(
            self.checkpoint_every >= 1,
            "domain.train.checkpoint_every must be at least 1"
        );
        Ok(())
    }

    pub fn lora(&self) -> LoraConfig {
        LoraConfig {
            rank: self.rank,
            alpha: self.alpha,
            targets: self
                .targets
                .iter()
                .filter_map(|t| parse_target(t))
                .collect(),
            dropout: self.dropout,
        }
    }
}

/// A trained domain adapter.
pub struct Trained {
    pub lora: Lora,
    pub curve: Vec<(usize, f64)>,
    pub steps: usize,
    /// Steps taken by this run (fewer than `steps` when it resumed).
    pub ran: usize,
}

/// The example indices of every step: each epoch a seeded shuffle, cut into batches.
pub fn schedule(n: usize, s: &DomainTrain) -> Vec<Vec<usize>> {
    let mut steps = Vec::new();
    for epoch in 0..s.epochs {
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            s.seed ^ (epoch as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        );
        order.shuffle(&mut rng);
        steps.extend(order.chunks(s.batch).map(<[usize]>::to_vec));
    }
    steps
}

/// SHA-256 over examples' ids and target starts: what a checkpoint must have been trained on.
pub fn examples_sha256(examples: &[Example]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for e in examples {
        h.update((e.ids.len() as u64).to_le_bytes());
        h.update((e.suffix_start as u64).to_le_bytes());
        for id in &e.ids {
            h.update(id.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// What a checkpoint's side file holds besides the tensors.
#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    step: usize,
    adam_step: i32,
    examples_sha256: String,
    settings: DomainTrain,
    curve: Vec<(usize, f64)>,
    span: (f64, usize),
}

const CKPT_TENSORS: &str = "checkpoint.safetensors";
const CKPT_META: &str = "checkpoint.json";

/// Called after every step with (steps done, steps in all, this step's loss); `false` stops
/// training there, with a checkpoint to resume from.
pub type OnStep<'a> = dyn FnMut(usize, usize, f64) -> bool + 'a;

/// Trains a LoRA on `examples` under `s`. With `work` set, a checkpoint is written there
/// every `checkpoint_every` steps and a matching one found there is resumed from; it is
/// removed once training ends.
pub fn train_domain(
    dec: &Decoder,
    examples: &[Example],
    s: &DomainTrain,
    work: Option<&Path>,
    on_step: &mut OnStep<'_>,
) -> Result<Trained> {
    s.validate()?;
    ensure!(!examples.is_empty(), "no training examples");
    let lora = Lora::new(dec.config(), &s.lora(), s.seed, dec.device(), dec.dtype())?;
    let vars = lora.vars();
    let mut opt = FastAdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: s.lr,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: s.weight_decay,
        },
    )?;
    let plan = schedule(examples.len(), s);
    let total = plan.len();
    let log_every = total.div_ceil(50).max(1);
    let data_sha = examples_sha256(examples);
    let mut curve = Vec::new();
    let mut span = (0.0f64, 0usize);
    let mut start = 0;
    if let Some(dir) = work {
        if let Some(meta) = resume(dir, &lora, &mut opt, &data_sha, s)? {
            start = meta.step;
            curve = meta.curve;
            span = meta.span;
            tracing::info!(
                step = start,
                "resuming from checkpoint in {}",
                dir.display()
            );
        }
    }
    for (k, group) in plan.iter().enumerate().skip(start) {
        let group: Vec<&Example> = group.iter().map(|&i| &examples[i]).collect();
        lora.begin_step(Some(s.seed.wrapping_add(k as u64)));
        let (loss, grads) = group_grads(
            dec,
            Some(&lora),
            &vars,
            &group,
            s.recompute_activations,
            s.bf16_products,
        )?;
        ensure!(
            loss.is_finite(),
            "training diverged at step {k} (loss {loss}); lower domain.train.lr"
        );
        opt.step_clipped(&grads, s.clip_norm)?;
        span = (span.0 + loss, span.1 + 1);
        let done = k + 1;
        if span.1 == log_every || done == total {
            curve.push((done, span.0 / span.1 as f64));
            span = (0.0, 0);
        }
        let go_on = on_step(done, total, loss);
        if let Some(dir) = work {
            if (done % s.checkpoint_every == 0 || !go_on) && done < total {
                save_checkpoint(dir, &lora, &opt, done, &data_sha, s, &curve, span)?;
            }
        }
        if !go_on && done < total {
            anyhow::bail!("training stopped after step {done} of {total}; run again to resume");
        }
    }
    lora.begin_step(None);
    if let Some(dir) = work {
        for f in [CKPT_TENSORS, CKPT_META] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    Ok(Trained {
        lora,
        curve,
        steps: total,
        ran: total - start,
    })
}

#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    dir: &Path,
    lora: &Lora,
    opt: &FastAdamW,
    step: usize,
    data_sha: &str,
    s: &DomainTrain,
    curve: &[(usize, f64)],
    span: (f64, usize),
) -> Result<()> {
    let Some((adam_step, moments)) = opt.state() else {
        // The candle fallback's moments are out of reach: no checkpoint rather than one that
        // would resume differently.
        return Ok(());
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (i, v) in lora.vars().iter().enumerate() {
        t.insert(format!("var.{i}"), v.as_tensor().to_device(&Device::Cpu)?);
    }
    for (i, (m, v)) in moments.into_iter().enumerate() {
        t.insert(
            format!("adam.m.{i}"),
            Tensor::from_vec(m.clone(), m.len(), &Device::Cpu)?,
        );
        t.insert(
            format!("adam.v.{i}"),
            Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?,
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Tensors first, then the meta that vouches for them: a run killed in between leaves a
    // meta that names the previous step's tensors only if the tensor write had not finished,
    // which the tensor count check below refuses.
    let tmp = dir.join(format!("{CKPT_TENSORS}.tmp"));
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::rename(&tmp, dir.join(CKPT_TENSORS))?;
    let meta = CheckpointMeta {
        step,
        adam_step,
        examples_sha256: data_sha.into(),
        settings: s.clone(),
        curve: curve.to_vec(),
        span,
    };
    super::card::write_atomic(
        &dir.join(CKPT_META),
        serde_json::to_string(&meta)?.as_bytes(),
    )
}

/// Loads a checkpoint in `dir` into `lora` and `opt` when one exists for this data and these
/// settings; a checkpoint of other data or settings is an error, not silently discarded.
fn resume(
    dir: &Path,
    lora: &Lora,
    opt: &mut FastAdamW,
    data_sha: &str,
    s: &DomainTrain,
) -> Result<Option<CheckpointMeta>> {
    let meta_path = dir.join(CKPT_META);
    let Ok(text) = std::fs::read_to_string(&meta_path) else {
        return Ok(None);
    };
    let meta: CheckpointMeta = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a checkpoint", meta_path.display()))?;
    ensure!(
        meta.examples_sha256 == data_sha && meta.settings == *s,
        "{} is a checkpoint of other data or settings; remove it (or pass --fresh) to start over",
        dir.display()
    );
    let mut t = candle_core::safetensors::load(dir.join(CKPT_TENSORS), &Device::Cpu)
        .with_context(|| format!("cannot read the checkpoint in {}", dir.display()))?;
    let vars = lora.vars();
    let mut moments = Vec::with_capacity(vars.len());
    for (i, v) in vars.iter().enumerate() {
        let mut take = |name: String| {
            t.remove(&name)
                .with_context(|| format!("checkpoint has no `{name}`"))
        };
        let saved = take(format!("var.{i}"))?;
        ensure!(
            saved.dims() == v.dims(),
            "checkpoint tensor var.{i} has another shape"
        );
        v.set(&saved.to_device(v.device())?.to_dtype(v.dtype())?)?;
        moments.push((
            take(format!("adam.m.{i}"))?.to_vec1::<f32>()?,
            take(format!("adam.v.{i}"))?.to_vec1::<f32>()?,
        ));
    }
    opt.restore(meta.adam_step, moments)?;
    Ok(Some(meta))
}
