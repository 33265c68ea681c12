//! The decoder's training paths, for adaptation: one block at a time (to rebuild activations
//! in the backward pass), the fused blocks with their own backward, and the head's loss without
//! logits. Inference (`forward`, `decode_step`) is in `mod.rs`; both share the blocks' weights.

use candle_core::{Result, Tensor};

use super::*;

impl Decoder {
    /// Block `layer` alone on `x` (`(batch, seq, hidden)`, positions from 0, no cache): with
    /// [`Decoder::embed_ids`] and [`Decoder::head_rows`], the same computation as
    /// [`Decoder::forward`], one block at a time. Training uses it to rebuild one block's
    /// activations at a time instead of keeping all of them.
    pub fn block_step(&self, layer: usize, x: &Tensor, opts: &ForwardOpts) -> Result<Tensor> {
        let step = self.step(layer, x, opts)?;
        if step.fused {
            return self.fused_block(step.block, layer, x, &step.cos, &step.sin, opts);
        }
        let mask = causal_mask(x.dim(1)?, 0, self.cfg.kv_group(), &self.device)?;
        let (cos, sin) = (&step.cos, &step.sin);
        self.block_forward(
            step.block,
            layer,
            x,
            cos,
            sin,
            mask.as_ref(),
            Kv::One(None),
            opts,
        )
    }

    /// What a cache-less pass of block `layer` over `x` needs: the block, rotary tables for
    /// `x`'s positions, and whether the fused ops take it.
    fn step(&self, layer: usize, x: &Tensor, opts: &ForwardOpts) -> Result<Step<'_>> {
        let block = self
            .blocks
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no block {layer}")))?;
        let t = x.dim(1)?;
        Ok(Step {
            block,
            cos: self.cos.narrow(0, 0, t)?,
            sin: self.sin.narrow(0, 0, t)?,
            fused: !opts.composed_ops && fused::applies(x) && t <= fused::MAX_POSITIONS,
        })
    }

    /// [`Decoder::block_forward`] without a cache, with the fused ops of [`super::fused`]
    /// (f32 on the CPU; causal from position 0).
    fn fused_block(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        let (x, s) = self.fused_mid(block, layer, x, cos, sin, opts)?;
        x + block.mlp.down.forward(&s, layer, opts)?
    }

    /// A scalar with the gradients (to `x` and every trained variable) of
    /// `sum(block_step(layer, x) * g)`, though not its value: the backward of a rebuilt block.
    /// Where the fused path applies and the down projection's weight is frozen, its product is
    /// left out: `sum(down(s) * g)` passes `s` the gradient `g W_down`, which is computed
    /// directly (the backward needs that product anyway), so the rebuild skips a quarter of a
    /// block's forward products.
    pub fn block_backward(
        &self,
        layer: usize,
        x: &Tensor,
        g: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        let step = self.step(layer, x, opts)?;
        let down = &step.block.mlp.down;
        if step.fused {
            if let Some(gd) = down.input_grad(g, opts)? {
                let (cos, sin) = (&step.cos, &step.sin);
                let (mid, s) = self.fused_mid(step.block, layer, x, cos, sin, opts)?;
                // The output is mid + s W^T (+ an adapter's delta on s).
                let mut obj = ((mid * g)?.sum_all()? + (&s * gd)?.sum_all()?)?;
                if let Some(d) = opts.adapter.map(|a| a.delta(layer, down.target, &s)) {
                    if let Some(d) = d? {
                        obj = (obj + (d * g)?.sum_all()?)?;
                    }
                }
                return Ok(obj);
            }
        }
        (self.block_step(layer, x, opts)? * g)?.sum_all()
    }

    /// The fused block up to the down projection: the residual stream after attention and
    /// the MLP's activation `silu(gate) * up`.
    fn fused_mid(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<(Tensor, Tensor)> {
        let eps = self.cfg.rms_norm_eps;
        let a = &block.attn;
        let h = fused::rms_norm(x, &block.input_norm, eps)?;
        let q = a.q.forward(&h, layer, opts)?;
        let k = a.k.forward(&h, layer, opts)?;
        let v = a.v.forward(&h, layer, opts)?;
        let y = fused::causal_attention(&q, &k, &v, a.n_heads, a.n_kv, cos, sin)?;
        let x = (x + a.o.forward(&y, layer, opts)?)?;
        let h = fused::rms_norm(&x, &block.post_norm, eps)?;
        let m = &block.mlp;
        let s = fused::swiglu(
            &m.gate.forward(&h, layer, opts)?,
            &m.up.forward(&h, layer, opts)?,
        )?;
        Ok((x, s))
    }

    /// The weighted cross-entropy `sum_r weights[r] * -log p(targets[r])` of the last block's
    /// output `x` at `rows` (at most 64), without materialising the logits; `None` where the
    /// fused loss does not apply (a trained head, a GPU, f64): use [`Decoder::head_rows`].
    pub fn head_loss(
        &self,
        x: &Tensor,
        rows: &Tensor,
        targets: &[u32],
        weights: &[f64],
        opts: &ForwardOpts,
    ) -> Result<Option<Tensor>> {
        let (b, t, h) = x.dims3()?;
        let trained = self.lm_head.is_variable();
        // A trained head changes between passes: a bf16 copy made once would go stale.
        let wb = (opts.bf16_frozen && !trained)
            .then(|| self.lm_head_bf16.get(&self.lm_head))
            .flatten();
        let w = wb.unwrap_or(&self.lm_head);
        let sink = opts.weight_grads.filter(|_| trained);
        if (trained && sink.is_none())
            || !crate::model::kernels::head_loss::supported(rows.dim(0)?, x.dtype(), w)
        {
            return Ok(None);
        }
        let picked = x.reshape((b * t, h))?.index_select(rows, 0)?;
        let normed = self.norm_with(&picked, &self.norm, opts)?;
        crate::model::kernels::head_loss::head_loss(&normed, w, targets, weights, sink).map(Some)
    }
}
