//! The suffix loss: a padded batch of examples through the decoder, the head's cross-entropy on
//! the suffix tokens only, and the gradients the kernels gather beside candle's.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

use super::*;

/// Mean cross-entropy of the suffix tokens given everything before them.
pub fn suffix_loss(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    ex: &Example,
    differentiable: bool,
) -> Result<Tensor> {
    batch_loss(dec, adapter, &[ex], differentiable)
}

/// A padded batch of examples: ids `(batch, t)`, the flattened rows whose logits predict a
/// suffix token, those tokens, and each row's weight in the mean of per-example means.
pub(super) struct Batch {
    pub(super) ids: Tensor,
    pub(super) rows: Vec<u32>,
    pub(super) targets: Vec<u32>,
    pub(super) weights: Vec<f64>,
    /// Target rows whose logits one chunk computes where the fused head loss does not apply
    /// ([`logit_rows`]).
    pub(super) logit_rows: usize,
    /// `rows[..trained]` belong to the loss that is trained; the rest to examples that are
    /// only scored in the same pass ([`Batch::scoring`]), their weights a mean of their own.
    pub(super) trained: usize,
}

/// Takes what one backward pass gave the trained variables.
pub(super) type CollectGrads<'a> = dyn FnMut(&GradStore) -> Result<()> + 'a;

/// Where full scope's weight gradients gather when the kernels that fill a [`WeightGrads`]
/// run (CPU, f32): `dec` is a trained copy.
pub(super) fn weight_sink(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
) -> Option<Arc<WeightGrads>> {
    let e = dec.embed_weight();
    let fits = e.is_variable() && e.device().is_cpu() && e.dtype() == DType::F32;
    (adapter.is_none() && fits).then(WeightGrads::new)
}

/// A training pass's embedding lookup whose rows are a variable of their own: their gradient
/// goes to the table's in the sink ([`Lookup::finish`]). candle's would be a zero table the
/// size of the vocabulary, a scatter, and an add into the tied head's gradient.
pub(super) struct Lookup {
    pub(super) rows: Var,
    pub(super) ids: Vec<u32>,
}

impl Lookup {
    /// The embedding of `ids` `(batch, seq)`, and with `sink` the lookup to finish.
    pub(super) fn embed(
        dec: &Decoder,
        ids: &Tensor,
        sink: Option<&Arc<WeightGrads>>,
    ) -> Result<(Tensor, Option<Self>)> {
        let e = dec.embed_ids(ids)?;
        if sink.is_none() || !e.track_op() {
            return Ok((e, None));
        }
        let rows = Var::from_tensor(&e.detach())?;
        let ids = ids.flatten_all()?.to_vec1::<u32>()?;
        Ok((rows.as_tensor().clone(), Some(Self { rows, ids })))
    }

    /// Adds `g`, the gradient of the looked-up rows, to the table's gradient in `sink`.
    pub(super) fn finish(&self, dec: &Decoder, g: &Tensor, sink: &WeightGrads) -> Result<()> {
        let g = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        sink.add_rows(dec.embed_weight(), &self.ids, &g)
    }
}

/// Each of `vars`' gradient: candle's (`grads`) plus what the sink gathered.
pub(super) fn merge_sink(
    vars: &[Var],
    grads: &mut [Option<Tensor>],
    sink: Option<&Arc<WeightGrads>>,
) -> Result<()> {
    let Some(sink) = sink else { return Ok(()) };
    for (v, acc) in vars.iter().zip(grads.iter_mut()) {
        if let Some(g) = sink.take(v.as_tensor())? {
            add_grad(acc, &g)?;
        }
    }
    Ok(())
}

/// Adds `g` to the gradient gathered so far in `acc`.
pub(super) fn add_grad(acc: &mut Option<Tensor>, g: &Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + g)?,
        None => g.clone(),
    });
    Ok(())
}

/// Rows of logits computed at a time on the CPU where the fused head loss does not apply
/// (f64, a trained head): a row is a vocabulary wide (49,152 floats for SmolLM2, 192 KB).
pub(super) const HEAD_ROWS: usize = 4;

/// Logit elements a GPU computes at once where the fused head loss does not apply: 128 MB of
/// f32 (682 rows of SmolLM2's vocabulary, 261 of Llama 3's). Every chunk costs a backward
/// pass of its own and a read of its loss on the host, which on a GPU is launches and a
/// synchronisation; a GPU has the memory for one chunk where the CPU takes ~40.
const GPU_LOGITS: usize = 32 << 20;

/// Rows of logits a chunk of the head loss takes on a device (CPU or not) for a vocabulary.
pub(crate) fn logit_rows(cpu: bool, vocab: usize) -> usize {
    if cpu {
        HEAD_ROWS
    } else {
        (GPU_LOGITS / vocab.max(1)).max(HEAD_ROWS)
    }
}

/// Target rows per call of the fused head loss, which holds no logits: its most rows.
pub(super) const FUSED_ROWS: usize = 64;

impl Batch {
    /// Sequences are right-padded: causal attention keeps padding from reaching real positions.
    pub(super) fn new(dec: &Decoder, examples: &[&Example]) -> Result<Self> {
        Self::scoring(dec, examples, &[])
    }

    /// `trained` examples, whose loss is trained, and after them in the same batch `scored`
    /// ones, whose loss ([`Batch::scored_loss`]) is only read: one pass for both.
    pub(super) fn scoring(
        dec: &Decoder,
        trained: &[&Example],
        scored: &[&Example],
    ) -> Result<Self> {
        let dev = dec.device();
        let examples = || trained.iter().chain(scored);
        let t = examples().map(|e| e.ids.len()).max().unwrap_or(0);
        if trained.is_empty() || t == 0 {
            candle_core::bail!("no examples to score");
        }
        let (mut ids, mut rows, mut targets, mut weights) = (vec![], vec![], vec![], vec![]);
        let mut trained_rows = 0;
        for (b, ex) in examples().enumerate() {
            let part = match b < trained.len() {
                true => trained.len(),
                false => scored.len(),
            };
            ids.extend_from_slice(&ex.ids);
            ids.extend(std::iter::repeat_n(0u32, t - ex.ids.len()));
            let n = ex.ids.len() - ex.suffix_start;
            for pos in ex.suffix_start..ex.ids.len() {
                // Position pos - 1 predicts token pos.
                rows.push((b * t + pos - 1) as u32);
                targets.push(ex.ids[pos]);
                weights.push(1.0 / (n * part) as f64);
            }
            if b + 1 == trained.len() {
                trained_rows = rows.len();
            }
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (trained.len() + scored.len(), t), dev)?,
            rows,
            targets,
            weights,
            logit_rows: logit_rows(dev.is_cpu(), dec.config().vocab_size),
            trained: trained_rows,
        })
    }

    /// Row indices `range` of the batch as a tensor.
    pub(super) fn rows(&self, range: std::ops::Range<usize>) -> Result<Tensor> {
        Tensor::new(&self.rows[range], self.ids.device())
    }

    /// The weighted cross-entropy of `logits`, whose rows are the targets `range`.
    pub(super) fn loss(&self, logits: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        // f32 loss (f64 for f64 weights).
        let acc = if logits.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let dev = logits.device();
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(acc)?, 1)?;
        let targets = Tensor::new(&self.targets[range.clone()], dev)?.unsqueeze(1)?;
        let picked = logp.gather(&targets, 1)?.squeeze(1)?;
        let weights = Tensor::new(&self.weights[range], dev)?.to_dtype(acc)?;
        (picked * weights)?.sum_all()?.neg()
    }

    /// The loss of the target rows from `start` (before `n`), and where the next chunk
    /// starts: up to [`FUSED_ROWS`] at once through the fused head loss where it applies,
    /// else `logit_rows` rows of logits.
    pub(super) fn chunk_loss(
        &self,
        dec: &Decoder,
        x: &Tensor,
        start: usize,
        n: usize,
        opts: &ForwardOpts,
    ) -> Result<(Tensor, usize)> {
        let fused = start..(start + FUSED_ROWS).min(n);
        let rows = self.rows(fused.clone())?;
        let (targets, weights) = (&self.targets[fused.clone()], &self.weights[fused.clone()]);
        if let Some(loss) = dec.head_loss(x, &rows, targets, weights, opts)? {
            return Ok((loss, fused.end));
        }
        let range = start..start.saturating_add(self.logit_rows).min(n);
        let logits = dec.head_rows(x, &self.rows(range.clone())?, opts)?;
        Ok((self.loss(&logits, range.clone())?, range.end))
    }

    /// The loss from the last block's output `x`, chunk by chunk. With `collect`, each chunk
    /// is backpropagated at once and `collect` takes what reached the trained variables;
    /// returns the loss and the gradient of `x` (if `x` is a variable).
    pub(super) fn chunked_head(
        &self,
        dec: &Decoder,
        x: &Tensor,
        opts: &ForwardOpts,
        mut collect: Option<&mut CollectGrads>,
    ) -> Result<(f64, Option<Tensor>)> {
        let (mut total, mut gx, mut start) = (0.0, None::<Tensor>, 0);
        while start < self.trained {
            let (loss, next) = self.chunk_loss(dec, x, start, self.trained, opts)?;
            start = next;
            total += scalar(&loss)?;
            if let Some(collect) = collect.as_mut() {
                let store = loss.backward()?;
                collect(&store)?;
                if let Some(g) = store.get(x) {
                    add_grad(&mut gx, g)?;
                }
            }
        }
        Ok((total, gx))
    }

    /// The loss from the last block's output `x` as one tensor, kept in the graph.
    pub(super) fn head_loss(
        &self,
        dec: &Decoder,
        x: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        let (mut total, mut start) = (None::<Tensor>, 0);
        while start < self.trained {
            let (loss, next) = self.chunk_loss(dec, x, start, self.trained, opts)?;
            start = next;
            total = Some(match total {
                Some(t) => (t + loss)?,
                None => loss,
            });
        }
        total.ok_or_else(|| candle_core::Error::Msg("no target rows".into()))
    }

    /// The scored examples' mean loss from the last block's output `x`, outside the graph
    /// (nothing of it is trained); `None` when the batch scores none.
    pub(super) fn scored_loss(
        &self,
        dec: &Decoder,
        x: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<Option<f64>> {
        let n = self.rows.len();
        if self.trained == n {
            return Ok(None);
        }
        // A trained head's gradient sink is the trained loss's.
        let opts = ForwardOpts {
            weight_grads: None,
            ..*opts
        };
        let (x, mut total, mut start) = (x.detach(), 0.0, self.trained);
        while start < n {
            let (loss, next) = self.chunk_loss(dec, &x, start, n, &opts)?;
            total += scalar(&loss)?;
            start = next;
        }
        Ok(Some(total))
    }
}

/// The mean over `examples` of each one's mean suffix cross-entropy, in one batched pass;
/// logits are computed only where a suffix token is predicted.
pub fn batch_loss(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    examples: &[&Example],
    differentiable: bool,
) -> Result<Tensor> {
    Ok(batch_loss_in(dec, adapter, examples, &[], differentiable, false, None)?.0)
}

/// [`batch_loss`], with frozen-weight products in bf16 when `bf16`, and trained weights'
/// gradients into `sink` (with the lookup whose gradient goes there too); `scored` examples
/// ride in the same pass, and their mean loss comes back beside (see [`Batch::scoring`]).
pub(super) fn batch_loss_in(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    examples: &[&Example],
    scored: &[&Example],
    differentiable: bool,
    bf16: bool,
    sink: Option<&Arc<WeightGrads>>,
) -> Result<(Tensor, Option<Lookup>, Option<f64>)> {
    let batch = Batch::scoring(dec, examples, scored)?;
    let opts = ForwardOpts {
        logits: Logits::None,
        differentiable,
        adapter,
        bf16_frozen: bf16,
        weight_grads: sink,
        ..Default::default()
    };
    let (mut x, lookup) = Lookup::embed(dec, &batch.ids, sink)?;
    for l in 0..dec.num_blocks() {
        x = dec.block_step(l, &x, &opts)?;
    }
    let loss = batch.head_loss(dec, &x, &opts)?;
    Ok((loss, lookup, batch.scored_loss(dec, &x, &opts)?))
}

pub(super) fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// Mean suffix loss over `examples`, without gradients; the logits are computed a few rows at
/// a time (a batch's all at once would be the largest buffer of an adaptation).
pub fn mean_loss(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    examples: &[Example],
) -> Result<f64> {
    mean_loss_in(dec, adapter, examples, false)
}

/// [`mean_loss`], with frozen-weight products in bf16 when `bf16`.
pub(super) fn mean_loss_in(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    examples: &[Example],
    bf16: bool,
) -> Result<f64> {
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = Batch::new(dec, &refs)?;
    let opts = ForwardOpts {
        logits: Logits::None,
        adapter,
        bf16_frozen: bf16,
        ..Default::default()
    };
    // Detached block by block: trained variables would otherwise make every block's
    // activations part of a graph that nothing will differentiate.
    let mut x = dec.embed_ids(&batch.ids)?.detach();
    for l in 0..dec.num_blocks() {
        x = dec.block_step(l, &x, &opts)?.detach();
    }
    Ok(batch.chunked_head(dec, &x, &opts, None)?.0)
}
