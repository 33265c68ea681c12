//! What one adaptation holds in memory, estimated from shapes before it starts, so the engine
//! can admit it against a budget instead of learning its size from the OOM killer.
//!
//! The estimate is an upper bound by construction (every term rounds up), and a test with a
//! counting allocator holds it above what adaptations of the tiny and the real model actually
//! allocate, and within a small factor of it (`tests/adapt_memory.rs`).

use super::{Example, LoraConfig, TrainParams};
use crate::model::{Decoder, ModelConfig};

/// What an adaptation trains.
#[derive(Debug, Clone, Copy)]
pub enum Trained<'a> {
    /// A fresh adapter of this shape.
    Lora(&'a LoraConfig),
    /// A private copy of every weight.
    Full,
}

/// Bytes of one adaptation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    /// At its peak while training: trained weights, their gradients and optimiser moments,
    /// and the activations a training step keeps for its backward pass.
    pub working: usize,
    /// What the result keeps while the request answers: the adapter, or the weight copy.
    pub resident: usize,
}

/// Elements a LoRA adapter of `lora`'s shape trains on `cfg`.
pub fn lora_elements(cfg: &ModelConfig, lora: &LoraConfig) -> usize {
    let per_layer: usize = lora
        .targets
        .iter()
        .map(|&t| {
            let (i, o) = super::lora::dims(cfg, t);
            lora.rank * (i + o)
        })
        .sum();
    per_layer * cfg.num_hidden_layers
}

/// Floats one block keeps per token for its backward pass: the inputs and outputs of its
/// norms, projections, rotary, SwiGLU and residuals (`6h + 2kv + 4i`, rounded up by a fifth),
/// and per query head and key position `attn` floats of attention. Measured (the test
/// above): the fused attention keeps no score matrices; its CUDA backward holds two for the
/// block being differentiated (its `ds` and `p`, f32), which the fused path's 2 covers. The
/// composed one (over [`Decoder::fused_attention_positions`], or off the fused path) keeps ~15
/// per head and key.
fn block_floats_per_token(cfg: &ModelConfig, seq: usize, attn: usize) -> usize {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_key_value_heads * cfg.head_dim();
    (6 * h + 2 * kv + 4 * i) * 6 / 5 + attn * cfg.num_attention_heads * seq
}

/// The estimate for adapting `dec` on `examples` with `p`.
pub fn footprint(
    dec: &Decoder,
    trained: Trained,
    examples: &[Example],
    p: &TrainParams,
) -> Footprint {
    let cfg = dec.config();
    let dsz = dec.dtype().size_in_bytes();
    let elements = match trained {
        Trained::Lora(l) => lora_elements(cfg, l),
        // Exactly what scope full copies and trains.
        Trained::Full => dec
            .named_weights()
            .iter()
            .map(|(_, w)| w.elem_count())
            .sum(),
    };
    let resident = elements * dsz;
    // Weights, two f32 moments, and the gradient twice over (candle's and the clipped or
    // merged one), f32 where the CPU sink gathers them.
    let state = elements * (dsz + 2 * 4 + 2 * dsz.max(4));
    let longest = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    // A first step that scores the other pairs (off the CPU) carries every pair.
    let group = match p.scores_in_first_step(dec.device()) {
        true => examples.len().max(1),
        false => p.grad_accum.max(1).min(examples.len().max(1)),
    };
    // Sequences are right-padded to the longest: every row costs `longest` positions.
    let step_tokens = group * longest;
    let all_tokens = examples.len() * longest;
    let fused = longest <= dec.fused_attention_positions();
    // Activations counted as f32 (bf16 attention and norms compute in f32).
    let (kept, light) = match fused {
        true => (2, 2),
        false => (20, 4),
    };
    let kept = block_floats_per_token(cfg, longest, kept) * 4;
    let light = block_floats_per_token(cfg, longest, light) * 4;
    let layers = cfg.num_hidden_layers;
    let train = match p.rebuilds_on(dec.device()) {
        // Every block's input, plus one block rebuilt with its gradients.
        true => layers * step_tokens * cfg.hidden_size * 4 + 2 * step_tokens * kept,
        false => layers * step_tokens * kept,
    };
    // Loss passes without gradients: all pairs at once, one block alive at a time.
    let score = all_tokens * light;
    // The head loss's rows of logits and their gradient (the CPU's fused loss takes up to 64
    // rows; elsewhere a chunk is `logit_rows`), and the gathered embedding rows.
    let rows = crate::adapt::train::logit_rows(dec.device().is_cpu(), cfg.vocab_size).max(64);
    let head = rows * cfg.vocab_size * 4 * 2 + step_tokens * cfg.hidden_size * 4 * 2;
    Footprint {
        working: state + train.max(score) + head,
        resident,
    }
}
