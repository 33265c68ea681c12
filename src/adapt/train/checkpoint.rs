//! One training step's gradients, from one pass over kept activations or with each block's
//! activations rebuilt during the backward pass (`[tta] recompute_activations`).

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use super::*;

/// What one training step's pass gave.
pub(super) struct Step {
    /// The group's loss.
    pub(super) loss: f64,
    /// Each of `vars`' gradient (`None` where a var got none).
    pub(super) grads: Vec<Option<Tensor>>,
    /// Time spent in the forward pass.
    pub(super) forward_ms: f64,
    /// The mean loss of the examples the pass scored beside the group, if it scored any.
    pub(super) scored: Option<f64>,
}

/// A training step's pass: the group `examples` trained on, `scored` ones only scored.
pub(super) type Pass =
    fn(&Decoder, Option<&dyn Adapter>, &[Var], &[&Example], &[&Example], bool) -> Result<Step>;

/// Loss of one group and the gradients of `vars` from one backward pass over all of it;
/// `scored` examples ride in the forward pass (their rows get no gradient).
pub(super) fn one_pass_grads(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    vars: &[Var],
    examples: &[&Example],
    scored: &[&Example],
    bf16: bool,
) -> Result<Step> {
    let tf = Instant::now();
    let sink = weight_sink(dec, adapter);
    let (loss, lookup, scored) =
        batch_loss_in(dec, adapter, examples, scored, true, bf16, sink.as_ref())?;
    let value = scalar(&loss)?;
    let forward_ms = tf.elapsed().as_secs_f64() * 1e3;
    let mut step = Step {
        loss: value,
        grads: vec![None; vars.len()],
        forward_ms,
        scored,
    };
    if !value.is_finite() {
        return Ok(step);
    }
    let store = loss.backward()?;
    if let (Some(lookup), Some(sink)) = (&lookup, &sink) {
        if let Some(g) = store.get(lookup.rows.as_tensor()) {
            lookup.finish(dec, g, sink)?;
        }
    }
    step.grads = vars
        .iter()
        .map(|v| store.get(v.as_tensor()).cloned())
        .collect();
    merge_sink(vars, &mut step.grads, sink.as_ref())?;
    Ok(step)
}

/// Loss of one group and the gradients of `vars` (`None` where a var got none), with one
/// block's activations alive at a time instead of every block's: the forward keeps only each
/// block's input; the backward then rebuilds block `l` from its input and backpropagates the
/// output's gradient `g` through it, as the gradient of the scalar `sum(block(x) * g)`. Costs
/// one more forward pass; saves the activations of all blocks but one (gradient
/// checkpointing, per block). `scored` examples ride in the first forward pass.
pub(super) fn checkpointed_grads(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    vars: &[Var],
    examples: &[&Example],
    scored: &[&Example],
    bf16: bool,
) -> Result<Step> {
    let tf = Instant::now();
    let batch = Batch::scoring(dec, examples, scored)?;
    let sink = weight_sink(dec, adapter);
    let opts = ForwardOpts {
        logits: Logits::None,
        differentiable: true,
        adapter,
        bf16_frozen: bf16,
        weight_grads: sink.as_ref(),
        ..Default::default()
    };
    let n = dec.num_blocks();
    let mut inputs = Vec::with_capacity(n);
    let mut x = dec.embed_ids(&batch.ids)?.detach();
    for l in 0..n {
        let y = dec.block_step(l, &x, &opts)?.detach();
        inputs.push(x);
        x = y;
    }
    let scored = batch.scored_loss(dec, &x, &opts)?;
    let last = Var::from_tensor(&x)?;
    drop(x);
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut collect = |store: &GradStore| -> Result<()> {
        for (v, acc) in vars.iter().zip(grads.iter_mut()) {
            if let Some(g) = store.get(v.as_tensor()) {
                add_grad(acc, g)?;
            }
        }
        Ok(())
    };
    // The head's forward and backward go together, chunk by chunk; its time counts as forward.
    let (loss, g) = batch.chunked_head(dec, last.as_tensor(), &opts, Some(&mut collect))?;
    let forward_ms = tf.elapsed().as_secs_f64() * 1e3;
    // A non-finite loss aborts the adaptation: no use rebuilding the blocks for it.
    let Some(mut g) = g.filter(|_| loss.is_finite()) else {
        return Ok(Step {
            loss,
            grads,
            forward_ms,
            scored,
        });
    };
    while let Some(input) = inputs.pop() {
        let l = inputs.len();
        let x = Var::from_tensor(&input)?.as_tensor().clone();
        drop(input);
        let store = dec.block_backward(l, &x, &g, &opts)?.backward()?;
        collect(&store)?;
        g = store
            .get(&x)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg(format!("block {l}: graph cut")))?;
    }
    // A trained embedding (full scope) takes the gradient of block 0's input.
    let (e, lookup) = Lookup::embed(dec, &batch.ids, sink.as_ref())?;
    match (&lookup, &sink) {
        (Some(lookup), Some(sink)) => lookup.finish(dec, &g, sink)?,
        _ if e.track_op() => collect(&(e * &g)?.sum_all()?.backward()?)?,
        _ => {}
    }
    merge_sink(vars, &mut grads, sink.as_ref())?;
    Ok(Step {
        loss,
        grads,
        forward_ms,
        scored,
    })
}

/// Loss of one group of examples and the gradients of `vars` (zeros where a var got none):
/// the request path's training step, for the offline domain trainer.
pub(crate) fn group_grads(
    dec: &Decoder,
    adapter: Option<&dyn Adapter>,
    vars: &[Var],
    group: &[&Example],
    recompute: bool,
    bf16: bool,
) -> Result<(f64, Vec<Tensor>)> {
    let pass: Pass = if recompute {
        checkpointed_grads
    } else {
        one_pass_grads
    };
    let Step { loss, grads, .. } = pass(dec, adapter, vars, group, &[], bf16)?;
    let grads = vars
        .iter()
        .zip(grads)
        .map(|(v, g)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
        .collect::<Result<Vec<_>>>()?;
    Ok((loss, grads))
}
