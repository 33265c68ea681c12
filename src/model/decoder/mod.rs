//! The decoder-only transformer (Llama; Qwen2 = Llama + q/k/v biases), written for this project
//! rather than taken from candle-transformers because we need logits at every position, the hidden
//! state of every layer (for the gate) and a differentiable path (for test-time adaptation).
//!
//! Tensors are generic over [`Device`] and [`DType`]. Norms and attention sum in f32 whatever
//! the weight dtype: training passes convert bf16/f16 activations to f32 for them; inference
//! passes keep the weights' dtype (KV cache included), since candle's fused norm, softmax and
//! matmul kernels already sum in f32, and each conversion is a kernel launch of its own
//! (unless [`Decoder::set_f32_norms_attention`] asks for the conversions).

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::Linear;

use super::kernels::cache_rows::{self, CacheRows};
use super::kernels::{decode_attention, fused};
use super::{ModelConfig, WeightGrads};

mod adapter;
mod cache;
mod step_graph;
mod training;

pub use adapter::{Adapter, Gathered, LowRank, PerRow, RowFactors, Target};
pub use cache::Cache;
pub use step_graph::StepGraph;

/// Which logits a forward pass computes.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    /// Every position, `(batch, seq, vocab)`.
    All,
    /// Only the last position, `(batch, vocab)`: what generation needs, and much cheaper.
    Last,
    /// None: hidden states only.
    None,
    /// Only these rows (u32 indices into the flattened `batch * seq` positions), `(n, vocab)`:
    /// training needs logits where there are targets, not over the whole prompt.
    Rows(&'a Tensor),
}

/// Options for one forward pass.
#[derive(Clone, Copy)]
pub struct ForwardOpts<'a> {
    pub logits: Logits<'a>,
    /// Return the hidden state entering the first block and leaving every block.
    pub hidden_states: bool,
    /// Run only the first `n` blocks (a probe reading layer `n` needs nothing above it).
    /// Requires `logits: Logits::None` and no cache, whose upper layers would stay empty.
    pub stop_after: Option<usize>,
    /// Use only ops with a backward pass. candle's fused softmax, rms-norm and rope silently
    /// cut the autograd graph, so training must take this path.
    pub differentiable: bool,
    pub adapter: Option<&'a dyn Adapter>,
    /// Frozen weights with few rows of input multiply in bf16 with f32 sums where the CPU
    /// has native bf16 dot products (adaptation only: answers keep the model's precision).
    pub bf16_frozen: bool,
    /// Trained weights' gradients from the few-row kernels go here instead of through candle
    /// (full-scope adaptation; see [`WeightGrads`]).
    pub weight_grads: Option<&'a Arc<WeightGrads>>,
    /// Keep candle's composed ops in [`Decoder::block_step`] where the fused ones would
    /// apply (see [`super::fused`]): the reference the fused ops are tested against.
    pub composed_ops: bool,
}

impl Default for ForwardOpts<'_> {
    fn default() -> Self {
        Self {
            logits: Logits::Last,
            hidden_states: false,
            stop_after: None,
            differentiable: false,
            adapter: None,
            bf16_frozen: false,
            weight_grads: None,
            composed_ops: false,
        }
    }
}

/// What a forward pass returns.
pub struct ForwardOutput {
    pub logits: Option<Tensor>,
    /// `hidden_states[0]` is the embedding output, `hidden_states[l]` the output of block `l`
    /// (1-based), before the final norm: `num_hidden_layers + 1` tensors of `(batch, seq, hidden)`.
    pub hidden_states: Vec<Tensor>,
}

/// Where a pass's keys and values go: one cache (or none) for the whole batch, one cache per
/// row (a batched decode step over sequences of different lengths), or one per row at
/// positions held on the device (a step that can be replayed from a captured graph).
enum Kv<'a, 'c> {
    One(Option<&'a mut cache::LayerCache>),
    Rows(&'a mut [&'c mut Cache]),
    At(&'a CacheRows),
}

/// Where a one-position step's keys and values go, for every layer: each row's cache, or
/// each layer's rows at positions held on the device.
enum StepKv<'a, 'c> {
    Rows(&'a mut [&'c mut Cache]),
    At(&'a [CacheRows]),
}

/// Runs an inference pass on a thread of rayon's pool. Its products are parallel loops;
/// started from a thread outside the pool, each loop parks the caller until the pool is done
/// and wakes it again (a futex round trip per product, about a fifth of a decode step on two
/// cores), while a pool thread takes part in its own loops. Only inference passes come here:
/// they hold no lock a pool thread could need while it waits in one of their loops.
///
/// On a GPU the pass stays on the calling thread: candle queues a thread's work on that
/// thread's own stream, and streams of different threads are not ordered with each other, so
/// a pass queued from a pool thread could still be running when the caller reads its result.
fn on_pool<T: Send>(device: &Device, f: impl FnOnce() -> T + Send) -> T {
    if !device.is_cpu() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran its body")
}

/// Precision for norms and attention: f32, or f64 when the weights are f64 (gradient checks).
fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Whether a decode step's fused CUDA kernels (`cuda::decode_step`) take `x` in a pass with
/// `opts`: an inference pass on a GPU, f32 or bf16, unless `opts.composed_ops`.
#[cfg(feature = "cuda")]
fn step_fused(x: &Tensor, opts: &ForwardOpts) -> bool {
    !opts.differentiable && !opts.composed_ops && super::kernels::cuda::decode_step::applies(x)
}

/// Whether the fused ops' CUDA bodies take `x` in a pass with `opts`: a differentiable pass on
/// a GPU, f32 or bf16, unless `opts.composed_ops` asks for candle's ops.
fn gpu_fused(x: &Tensor, opts: &ForwardOpts) -> bool {
    #[cfg(feature = "cuda")]
    {
        opts.differentiable
            && !opts.composed_ops
            && super::kernels::cuda::enabled()
            && x.device().is_cuda()
            && matches!(x.dtype(), DType::F32 | DType::BF16)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, opts);
        false
    }
}

/// RMS norm of `x` by `w`, computed on `dt` operands (a no-op conversion where `x` has it).
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, diff: bool, dt: DType) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(dt)?;
    let w32 = w.to_dtype(dt)?;
    // The fused kernel has no backward, and none for f64 either.
    let y = if diff || dtype == DType::F64 {
        candle_nn::ops::rms_norm_slow(&x, &w32, eps as f32)?
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, &w32, eps as f32)?
    };
    y.to_dtype(dtype)
}

struct Proj {
    linear: Linear,
    /// Quantized copy of the weight for decode steps (memory-bound: fewer bytes per token).
    quant: Option<super::kernels::quant::DecodeMatmul>,
    /// bf16 copy of the weight for adaptation's products, made on first use.
    bf16: super::Bf16Weight,
    target: Target,
}

/// Decode steps feed at most this many new positions; longer inputs (prefill, training) are
/// compute-bound and use the full-precision weights.
const QUANT_MAX_POSITIONS: usize = 4;

fn use_quant(x: &Tensor, opts: &ForwardOpts) -> bool {
    !opts.differentiable
        && x.dims().iter().rev().nth(1).copied().unwrap_or(0) <= QUANT_MAX_POSITIONS
}

impl Proj {
    fn new(weights: &mut Weights, name: &str, bias: bool, target: Target) -> Result<Self> {
        let w = weights.take(&format!("{name}.weight"))?;
        let b = if bias {
            Some(weights.take(&format!("{name}.bias"))?)
        } else {
            None
        };
        Ok(Self {
            linear: Linear::new(w, b),
            quant: None,
            bf16: Default::default(),
            target,
        })
    }

    /// `y`, this projection's decode product of `x`, with its bias and adapter delta added.
    fn finish_decode(
        &self,
        y: Tensor,
        x: &Tensor,
        layer: usize,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        Ok(self.decode_extras(&y, x, layer, opts)?.unwrap_or(y))
    }

    /// `y` with this projection's bias and adapter delta added, or `None` where it has
    /// neither here (`y` is then the output as it stands).
    fn decode_extras(
        &self,
        y: &Tensor,
        x: &Tensor,
        layer: usize,
        opts: &ForwardOpts,
    ) -> Result<Option<Tensor>> {
        let biased = match self.linear.bias() {
            Some(b) => Some(y.broadcast_add(b)?),
            None => None,
        };
        let base = biased.as_ref().unwrap_or(y);
        Ok(self.with_delta(base, x, layer, opts)?.or(biased))
    }

    fn add_delta(&self, y: Tensor, x: &Tensor, layer: usize, opts: &ForwardOpts) -> Result<Tensor> {
        Ok(self.with_delta(&y, x, layer, opts)?.unwrap_or(y))
    }

    /// `y` with the adapter's delta for this projection added, or `None` where it has none.
    fn with_delta(
        &self,
        y: &Tensor,
        x: &Tensor,
        layer: usize,
        opts: &ForwardOpts,
    ) -> Result<Option<Tensor>> {
        let Some(a) = opts.adapter else {
            return Ok(None);
        };
        #[cfg(feature = "cuda")]
        {
            use super::kernels::cuda::lora;
            // A decode step's delta added in one launch (`cuda::lora`).
            if !opts.differentiable && !opts.composed_ops && lora::applies(x) {
                if let Some(f) = a.row_factors(layer, self.target, x)? {
                    let (fa, fb, scales, scale) = f.parts();
                    if let Some(y) = lora::add(y, x, fa, fb, scales, scale)? {
                        return Ok(Some(y));
                    }
                }
            }
        }
        match a.delta(layer, self.target, x)? {
            Some(d) => Ok(Some((y + d)?)),
            None => Ok(None),
        }
    }

    fn forward(&self, x: &Tensor, layer: usize, opts: &ForwardOpts) -> Result<Tensor> {
        let y = match &self.quant {
            Some(q) if use_quant(x, opts) => {
                let y = q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
                return self.finish_decode(y, x, layer, opts);
            }
            // Frozen weights, or no gradient wanted: no weight gradient, and few-row inputs
            // (training, scoring, a full-scope copy's decode steps) take the few-row kernels.
            _ if !opts.differentiable || !self.linear.weight().is_variable() => {
                let w = self.linear.weight();
                // A trained weight changes between passes: a copy made once would go stale.
                let frozen = !w.is_variable();
                let wb = (opts.bf16_frozen && frozen)
                    .then(|| self.bf16.get(w))
                    .flatten();
                let y = super::frozen_matmul_bf16(x, w, wb)?;
                match self.linear.bias() {
                    Some(b) if !b.is_variable() => y.broadcast_add(&b.detach())?,
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
            // A trained weight (full scope).
            _ => {
                let y = super::kernels::trained_matmul::trained_matmul(
                    x,
                    self.linear.weight(),
                    opts.weight_grads,
                )?;
                match self.linear.bias() {
                    Some(b) => y.broadcast_add(b)?,
                    None => y,
                }
            }
        };
        self.add_delta(y, x, layer, opts)
    }
}

/// Projections that read the same input (q, k, v; gate, up) as one decode product: their
/// weights stacked by output row, so a decode step runs one product instead of one per
/// projection. On the CPU the stack is quantized (one input quantization, one parallel
/// dispatch; each output element is the same fixed computation on its own weight row as in a
/// product of its own, so the results are the same bits either way); on a GPU it is the
/// full-precision weights themselves, of which the parts' weights are views (no second
/// copy): one launch instead of three, or two.
struct Joint {
    body: JointBody,
    widths: Vec<usize>,
}

enum JointBody {
    Quant(super::kernels::quant::DecodeMatmul),
    /// The stacked weights, used for inputs of at most `max_rows` rows.
    Full {
        w: Tensor,
        max_rows: usize,
    },
}

impl Joint {
    fn new(parts: &[&Proj], dtype: GgmlDType) -> Result<Self> {
        let ws = parts
            .iter()
            .map(|p| p.linear.weight().clone())
            .collect::<Vec<_>>();
        Ok(Self {
            body: JointBody::Quant(super::kernels::quant::DecodeMatmul::new(
                &Tensor::cat(&ws, 0)?,
                dtype,
            )?),
            widths: ws.iter().map(|w| w.dim(0)).collect::<Result<_>>()?,
        })
    }

    /// Stacks the full-precision weights of `parts` and makes each part's weight a view into
    /// the stack; `None` where a weight is trained (full scope's copy: its variables must
    /// stay the tensors the projections multiply by).
    fn full(parts: &mut [&mut Proj], max_rows: usize) -> Result<Option<Self>> {
        if parts.iter().any(|p| p.linear.weight().is_variable()) {
            return Ok(None);
        }
        let ws = parts
            .iter()
            .map(|p| p.linear.weight().clone())
            .collect::<Vec<_>>();
        let w = Tensor::cat(&ws, 0)?;
        let widths: Vec<usize> = ws.iter().map(|w| w.dim(0)).collect::<Result<_>>()?;
        let mut at = 0;
        for (p, &n) in parts.iter_mut().zip(&widths) {
            let bias = p.linear.bias().cloned();
            p.linear = Linear::new(w.narrow(0, at, n)?, bias);
            at += n;
        }
        Ok(Some(Self {
            body: JointBody::Full { w, max_rows },
            widths,
        }))
    }

    /// Whether this pass takes the joint product for `x`.
    fn takes(&self, x: &Tensor, opts: &ForwardOpts) -> bool {
        match &self.body {
            JointBody::Quant(_) => use_quant(x, opts),
            JointBody::Full { max_rows, .. } => {
                let rows = x.elem_count() / x.dim(D::Minus1).unwrap_or(1).max(1);
                !opts.differentiable && rows <= *max_rows
            }
        }
    }

    /// Each part's output for `x`, its bias and adapter delta added.
    fn forward(
        &self,
        parts: &[&Proj],
        x: &Tensor,
        layer: usize,
        opts: &ForwardOpts,
    ) -> Result<JointOut> {
        let y = self.product(x)?;
        let mut plain = true;
        let parts = parts
            .iter()
            .zip(self.views(&y)?)
            .map(|(p, part)| {
                Ok(match p.decode_extras(&part, x, layer, opts)? {
                    Some(changed) => {
                        plain = false;
                        changed
                    }
                    None => part,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(JointOut {
            whole: plain.then_some(y),
            parts,
        })
    }

    /// The joint product of `x`, nothing added.
    fn product(&self, x: &Tensor) -> Result<Tensor> {
        match &self.body {
            JointBody::Quant(q) => q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
            JointBody::Full { w, .. } => super::frozen_matmul_bf16(x, w, None),
        }
    }

    /// Each part's slice of the joint product `y` (views).
    fn views(&self, y: &Tensor) -> Result<Vec<Tensor>> {
        let mut at = 0;
        self.widths
            .iter()
            .map(|&w| {
                at += w;
                y.narrow(D::Minus1, at - w, w)
            })
            .collect()
    }
}

/// A joint product's parts, and the product itself where no part added anything to its
/// slice (a kernel may then read the parts from it in place).
struct JointOut {
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    whole: Option<Tensor>,
    parts: Vec<Tensor>,
}

impl Proj {
    /// `g W` for a frozen weight (the gradient its product passes to its input), `None` for a
    /// trained one, whose own gradient needs the product's graph.
    fn input_grad(&self, g: &Tensor, opts: &ForwardOpts) -> Result<Option<Tensor>> {
        let w = self.linear.weight();
        if w.is_variable() || self.linear.bias().is_some_and(|b| b.is_variable()) {
            return Ok(None);
        }
        let wb = opts.bf16_frozen.then(|| self.bf16.get(w)).flatten();
        super::frozen_input_grad(g, w, wb).map(Some)
    }
}

/// See [`Decoder::step`].
struct Step<'a> {
    block: &'a Block,
    cos: Tensor,
    sin: Tensor,
    fused: bool,
}

struct Attention {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    /// q, k and v as one decode product (their own decode copies are then dropped).
    qkv: Option<Joint>,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

struct Mlp {
    gate: Proj,
    up: Proj,
    down: Proj,
    /// gate and up as one decode product.
    gate_up: Option<Joint>,
}

struct Block {
    attn: Attention,
    mlp: Mlp,
    input_norm: Tensor,
    post_norm: Tensor,
}

/// Weights by Hugging Face name; `take` removes them so leftovers can be reported.
pub struct Weights {
    map: HashMap<String, Tensor>,
}

impl Weights {
    pub fn new(map: HashMap<String, Tensor>) -> Self {
        Self { map }
    }

    fn take(&mut self, name: &str) -> Result<Tensor> {
        self.map
            .remove(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing weight `{name}`")))
    }
}

/// A loaded decoder. Immutable after load: share it behind an `Arc` across worker threads.
pub struct Decoder {
    cfg: ModelConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    lm_head_quant: Option<super::kernels::quant::DecodeMatmul>,
    lm_head_bf16: super::Bf16Weight,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
    /// Inference passes convert to f32 for norms and attention, as training passes do.
    f32_norms_attention: bool,
}

impl Decoder {
    /// Builds the decoder from Hugging Face-named weights already on `device` in `dtype`.
    pub fn load(cfg: &ModelConfig, weights: HashMap<String, Tensor>) -> Result<Self> {
        let mut w = Weights::new(weights);
        let embed = w.take("model.embed_tokens.weight")?;
        let device = embed.device().clone();
        let dtype = embed.dtype();
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let bias = cfg.attention_bias;
            let attn = Attention {
                q: Proj::new(&mut w, &format!("{p}.self_attn.q_proj"), bias, Target::Q)?,
                k: Proj::new(&mut w, &format!("{p}.self_attn.k_proj"), bias, Target::K)?,
                v: Proj::new(&mut w, &format!("{p}.self_attn.v_proj"), bias, Target::V)?,
                o: Proj::new(&mut w, &format!("{p}.self_attn.o_proj"), false, Target::O)?,
                qkv: None,
                n_heads: cfg.num_attention_heads,
                n_kv: cfg.num_key_value_heads,
                head_dim: cfg.head_dim(),
            };
            let mlp = Mlp {
                gate: Proj::new(&mut w, &format!("{p}.mlp.gate_proj"), false, Target::Gate)?,
                up: Proj::new(&mut w, &format!("{p}.mlp.up_proj"), false, Target::Up)?,
                down: Proj::new(&mut w, &format!("{p}.mlp.down_proj"), false, Target::Down)?,
                gate_up: None,
            };
            blocks.push(Block {
                attn,
                mlp,
                input_norm: w.take(&format!("{p}.input_layernorm.weight"))?,
                post_norm: w.take(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        let norm = w.take("model.norm.weight")?;
        let lm_head = match w.take("lm_head.weight") {
            Ok(t) => t,
            Err(_) if cfg.tie_word_embeddings => embed.clone(),
            Err(e) => return Err(e),
        };
        let (cos, sin) = rope_tables(cfg, &device)?;
        let mut dec = Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            lm_head_quant: None,
            lm_head_bf16: Default::default(),
            cos,
            sin,
            device,
            dtype,
            f32_norms_attention: false,
        };
        // On a GPU a decode step is launch-bound: one product for q, k, v and one for
        // gate, up. (The CPU has its own joint products, quantized: `quantize_for_decode`.)
        if !dec.device.is_cpu() {
            dec.join_projections()?;
        }
        Ok(dec)
    }

    /// Stacks q, k and v, and gate and up, into one weight each whose parts the projections
    /// then view, for one decode product where there were three and two: q, k, v for
    /// single-row steps (a batch's parts would need copies to split), gate and up for any
    /// decode step. Trained weights (a full-scope copy) stay apart.
    pub fn join_projections(&mut self) -> Result<()> {
        for b in &mut self.blocks {
            let (a, m) = (&mut b.attn, &mut b.mlp);
            if a.qkv.is_none() {
                a.qkv = Joint::full(&mut [&mut a.q, &mut a.k, &mut a.v], 1)?;
            }
            if m.gate_up.is_none() {
                m.gate_up = Joint::full(&mut [&mut m.gate, &mut m.up], QUANT_MAX_POSITIONS)?;
            }
        }
        Ok(())
    }

    /// Makes inference passes of a bf16/f16 model run norms and attention on f32 operands
    /// (and keep the KV cache in f32), as before the native path: the reference it is
    /// compared against, and a switch (`[model] f32_norms_attention`).
    pub fn set_f32_norms_attention(&mut self, on: bool) {
        self.f32_norms_attention = on;
    }

    /// The dtype norms and attention take their operands in: f32 (f64 for f64 weights) for a
    /// differentiable pass, the weights' dtype otherwise.
    fn work_dtype(&self, differentiable: bool) -> DType {
        if differentiable || self.f32_norms_attention {
            acc_dtype(self.dtype)
        } else {
            self.dtype
        }
    }

    /// The RMS norm of a pass.
    fn norm(&self, x: &Tensor, w: &Tensor, differentiable: bool) -> Result<Tensor> {
        let dt = self.work_dtype(differentiable);
        rms_norm(x, w, self.cfg.rms_norm_eps, differentiable, dt)
    }

    /// The RMS norm of a pass with `opts`: a differentiable pass on a GPU takes the fused op
    /// (a launch each way, in f32) where candle's composed ops take about six and a dozen,
    /// unless `opts.composed_ops` asks for those.
    fn norm_with(&self, x: &Tensor, w: &Tensor, opts: &ForwardOpts) -> Result<Tensor> {
        if gpu_fused(x, opts) {
            let f32 = DType::F32;
            let y = fused::rms_norm(&x.to_dtype(f32)?, &w.to_dtype(f32)?, self.cfg.rms_norm_eps)?;
            return y.to_dtype(x.dtype());
        }
        self.norm(x, w, opts.differentiable)
    }

    /// Adds a quantized copy of every projection and of the output head, used by decode steps
    /// (a few new positions, no gradients). Prefill and training keep the full weights. With
    /// q4_1 the head stays q8_0, as a GGUF of q4_1 blocks stores its embedding table (and as
    /// llama.cpp reads it): the one matrix every logit comes from keeps its precision.
    pub fn quantize_for_decode(&mut self, dtype: GgmlDType) -> Result<()> {
        for b in &mut self.blocks {
            let (a, m) = (&mut b.attn, &mut b.mlp);
            a.qkv = Some(Joint::new(&[&a.q, &a.k, &a.v], dtype)?);
            m.gate_up = Some(Joint::new(&[&m.gate, &m.up], dtype)?);
            for p in [&mut a.o, &mut m.down] {
                p.quant = Some(super::kernels::quant::DecodeMatmul::new(
                    p.linear.weight(),
                    dtype,
                )?);
            }
        }
        let head = match dtype {
            GgmlDType::Q4_1 => GgmlDType::Q8_0,
            d => d,
        };
        self.lm_head_quant = Some(super::kernels::quant::DecodeMatmul::new(
            &self.lm_head,
            head,
        )?);
        Ok(())
    }

    /// Every weight under its Hugging Face name, as [`Decoder::load`] takes them (a tied output
    /// head is not listed separately). The tensors share storage with the model.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), self.embed.clone()),
            ("model.norm.weight".to_string(), self.norm.clone()),
        ];
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.clone()));
        }
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            for (name, proj) in [
                ("self_attn.q_proj", &b.attn.q),
                ("self_attn.k_proj", &b.attn.k),
                ("self_attn.v_proj", &b.attn.v),
                ("self_attn.o_proj", &b.attn.o),
                ("mlp.gate_proj", &b.mlp.gate),
                ("mlp.up_proj", &b.mlp.up),
                ("mlp.down_proj", &b.mlp.down),
            ] {
                out.push((format!("{p}.{name}.weight"), proj.linear.weight().clone()));
                if let Some(bias) = proj.linear.bias() {
                    out.push((format!("{p}.{name}.bias"), bias.clone()));
                }
            }
            out.push((format!("{p}.input_layernorm.weight"), b.input_norm.clone()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                b.post_norm.clone(),
            ));
        }
        out
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh KV cache sized for `capacity` positions (it grows if exceeded).
    pub fn new_cache(&self, capacity: usize) -> Cache {
        Cache::new(&self.cfg, capacity)
    }

    /// Longest sequence whose training attention runs fused (no score matrices kept for the
    /// backward pass); 0 where the fused kernels do not apply (f16/bf16, a GPU without
    /// `[model] cuda_fused_training`).
    pub fn fused_attention_positions(&self) -> usize {
        match fused::takes(self.dtype(), self.device()) {
            true => fused::MAX_POSITIONS,
            false => 0,
        }
    }

    /// Bytes a cache holds per position: keys and values of every layer, in attention's dtype
    /// (f32 unless the weights are f64). A cache of capacity `n` allocates `n` times this.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.cfg;
        let width = self.work_dtype(false).size_in_bytes();
        c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim() * width
    }

    /// `(batch, vocab)` logits of `last` (`(batch, 1, hidden)`), the blocks' output.
    fn last_logits(&self, last: &Tensor, differentiable: bool) -> Result<Tensor> {
        let h = self.norm(last, &self.norm, differentiable)?;
        self.normed_logits(&h, differentiable)
    }

    /// [`last_logits`](Self::last_logits) of `h`, the blocks' output already normed.
    fn normed_logits(&self, h: &Tensor, differentiable: bool) -> Result<Tensor> {
        let logits = match &self.lm_head_quant {
            Some(q) if !differentiable => {
                q.forward(&h.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?
            }
            // The few-row kernels compute each row on its own; gemm's blocking depends on
            // the row count, which would make a row's logits depend on its batch.
            _ if !differentiable => self.head(h, false)?,
            _ => h.broadcast_matmul(&self.lm_head.t()?)?,
        };
        logits.squeeze(1)
    }

    /// One decode step of several sequences at once: `tokens[i]` continues the sequence
    /// cached in `caches[i]`, each at its own length. Embedding, norms, projections and head
    /// run once over all rows (the weights are read once per step, not once per sequence);
    /// attention runs per row against that row's cache. Returns `(rows, vocab)` logits. An
    /// adapter in `opts` sees every row: [`PerRow`] gives each row its own.
    pub fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        on_pool(&self.device, || self.decode_step_here(tokens, caches, opts))
    }

    fn decode_step_here(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Cache],
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        if tokens.is_empty() || tokens.len() != caches.len() {
            candle_core::bail!(
                "decode_step: {} tokens for {} caches",
                tokens.len(),
                caches.len()
            );
        }
        let positions = caches
            .iter()
            .map(|c| {
                let p = c.len();
                if p + 1 > self.cfg.max_position_embeddings {
                    candle_core::bail!(
                        "sequence of {} positions exceeds the model's context of {}",
                        p + 1,
                        self.cfg.max_position_embeddings
                    );
                }
                Ok(p as u32)
            })
            .collect::<Result<Vec<u32>>>()?;
        let ids = Tensor::new(tokens, &self.device)?;
        let pos = Tensor::new(positions.as_slice(), &self.device)?;
        self.one_position(&ids, &pos, StepKv::Rows(caches), opts)
    }

    /// [`decode_step`](Self::decode_step) with every input that changes from one token to the
    /// next read on the device: row `r` continues with token `ids[r]` at position
    /// `positions[r]` (both `(rows,)` u32), writing its keys and values into the buffers of
    /// `rows` (from [`cache_rows`](Self::cache_rows)), which the caller then counts with
    /// `Cache::advance`. Nothing is uploaded or read back, so on a GPU the step can be
    /// captured once and replayed per token (`StepGraph`); on the CPU it gives the bits of
    /// `decode_step`. Unlike `decode_step` it runs on the calling thread: `StepGraph` puts
    /// its writes of the inputs and the step on one thread (one stream) together.
    pub fn device_step(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        rows: &[CacheRows],
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        if rows.len() != self.blocks.len() {
            candle_core::bail!(
                "device_step: {} layers of rows for {}",
                rows.len(),
                self.blocks.len()
            );
        }
        self.one_position(ids, positions, StepKv::At(rows), opts)
    }

    /// One position of each row (`ids`, `positions`: `(rows,)` u32) through every block, its
    /// keys and values to `kv`; `(rows, vocab)` logits. What `decode_step` and `device_step`
    /// share.
    fn one_position(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mut kv: StepKv<'_, '_>,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        if opts.differentiable || opts.stop_after.is_some() || opts.hidden_states {
            candle_core::bail!(
                "decode steps are inference only: no gradients, hidden states or stop_after"
            );
        }
        // Each row's rotary angles are those of its own position: `(rows, 1, head_dim / 2)`.
        let dt = self.work_dtype(false);
        let angles = |t: &Tensor| t.index_select(positions, 0)?.unsqueeze(1)?.to_dtype(dt);
        let (cos, sin) = (angles(&self.cos)?, angles(&self.sin)?);
        let mut x = self.embed_ids(&ids.unsqueeze(1)?)?;
        let Some(first) = self.blocks.first() else {
            candle_core::bail!("a model without blocks");
        };
        // Each block's MLP output is added together with the next block's input norm, the
        // last block's with the final norm.
        let mut h = self.norm_with(&x, &first.input_norm, opts)?;
        for (l, block) in self.blocks.iter().enumerate() {
            let layer = match &mut kv {
                StepKv::Rows(caches) => Kv::Rows(caches),
                StepKv::At(rows) => Kv::At(&rows[l]),
            };
            let (mid, y) = self.block_parts(block, l, &x, &h, &cos, &sin, None, layer, opts)?;
            let next = self.blocks.get(l + 1).map_or(&self.norm, |b| &b.input_norm);
            (x, h) = self.residual_norm(&mid, &y, next, opts)?;
        }
        self.normed_logits(&h, false)
    }

    /// Whether decode steps here are captured as graphs and replayed (`[model] cuda_graphs` on
    /// a CUDA device): where they are, [`StepGraph`]s pay; elsewhere ordinary steps serve.
    pub fn replays_steps(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.device.is_cuda() && super::kernels::cuda::graph::enabled()
        }
        #[cfg(not(feature = "cuda"))]
        {
            false
        }
    }

    /// Whether [`device_step`](Self::device_step) serves caches of `capacity` positions here:
    /// f32 on the CPU; f32 or bf16 on a GPU, up to what its attention kernel holds.
    pub fn device_steps_serve(&self, capacity: usize) -> bool {
        let dt = self.work_dtype(false);
        cache_rows::applies(&self.device, dt, self.cfg.head_dim(), capacity)
    }

    /// Each layer's [`CacheRows`] over `caches` (row `r` reads `positions[r]`), for
    /// [`device_step`](Self::device_step). The caches must hold something (a prefill) and
    /// keep their buffers while the rows live: reserve room first (`Cache::reserve`).
    pub fn cache_rows(&self, caches: &[&Cache], positions: &Tensor) -> Result<Vec<CacheRows>> {
        let capacity = caches.iter().map(|c| c.capacity()).max().unwrap_or(0);
        if !self.device_steps_serve(capacity) {
            candle_core::bail!(
                "device_step does not serve {:?} caches of {capacity} positions on {:?}",
                self.work_dtype(false),
                self.device
            );
        }
        (0..self.blocks.len())
            .map(|l| {
                let buffers = caches
                    .iter()
                    .map(|c| match c.layers[l].buffers() {
                        Some(b) => Ok(b.clone()),
                        None => candle_core::bail!("device_step: a cache holds nothing yet"),
                    })
                    .collect::<Result<Vec<_>>>()?;
                CacheRows::new(buffers, positions)
            })
            .collect()
    }

    /// Runs `ids` (`(batch, seq)`, u32) through the model. With a cache, positions continue
    /// after what the cache holds and the new keys/values are appended to it.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut Cache>,
        opts: &ForwardOpts,
    ) -> Result<ForwardOutput> {
        if opts.differentiable {
            return self.forward_here(ids, cache, opts);
        }
        on_pool(&self.device, || self.forward_here(ids, cache, opts))
    }

    fn forward_here(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut Cache>,
        opts: &ForwardOpts,
    ) -> Result<ForwardOutput> {
        let (_, t) = ids.dims2()?;
        if opts.stop_after.is_some() && (cache.is_some() || !matches!(opts.logits, Logits::None)) {
            candle_core::bail!("stop_after needs Logits::None and no cache");
        }
        let offset = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if offset + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's context of {}",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        let mut x = self.embed_ids(ids)?;
        // Converted once per pass, not once per layer.
        let dt = self.work_dtype(opts.differentiable);
        let cos = self.cos.narrow(0, offset, t)?.to_dtype(dt)?;
        let sin = self.sin.narrow(0, offset, t)?.to_dtype(dt)?;
        let mask = causal_mask(t, offset, self.cfg.kv_group(), &self.device)?
            .map(|m| m.to_dtype(dt))
            .transpose()?;
        let mut hidden = Vec::new();
        if opts.hidden_states {
            hidden.push(x.clone());
        }
        let depth = opts.stop_after.unwrap_or(self.blocks.len());
        for (l, block) in self.blocks.iter().take(depth).enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[l]);
            let kv = Kv::One(layer_cache);
            x = self.block_forward(block, l, &x, &cos, &sin, mask.as_ref(), kv, opts)?;
            if opts.hidden_states {
                hidden.push(x.clone());
            }
        }
        let logits = match opts.logits {
            Logits::None => None,
            Logits::All => {
                let h = self.norm(&x, &self.norm, opts.differentiable)?;
                Some(self.head(&h, opts.bf16_frozen)?)
            }
            Logits::Rows(rows) => Some(self.head_rows(&x, rows, opts)?),
            Logits::Last => Some(self.last_logits(&x.narrow(1, t - 1, 1)?, opts.differentiable)?),
        };
        Ok(ForwardOutput {
            logits,
            hidden_states: hidden,
        })
    }

    /// The embedding of `ids` (`(batch, seq)`), the input of block 0.
    /// The token embedding table `(vocab, hidden)` (shared with a tied head).
    pub fn embed_weight(&self) -> &Tensor {
        &self.embed
    }

    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))
    }

    /// Logits `(n, vocab)` of the last block's output `x` (`(batch, seq, hidden)`) at `rows`,
    /// indices into the flattened `batch * seq` positions.
    pub fn head_rows(&self, x: &Tensor, rows: &Tensor, opts: &ForwardOpts) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let picked = x.reshape((b * t, h))?.index_select(rows, 0)?;
        let h = self.norm_with(&picked, &self.norm, opts)?;
        self.head(&h, opts.bf16_frozen)
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Full-precision output projection.
    fn head(&self, h: &Tensor, bf16: bool) -> Result<Tensor> {
        if !self.lm_head.is_variable() {
            let wb = bf16.then(|| self.lm_head_bf16.get(&self.lm_head)).flatten();
            super::frozen_matmul_bf16(h, &self.lm_head, wb)
        } else {
            super::kernels::trained_matmul::trained_matmul(h, &self.lm_head, None)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Kv<'_, '_>,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        let h = self.norm_with(x, &block.input_norm, opts)?;
        let (x, y) = self.block_parts(block, layer, x, &h, cos, sin, mask, kv, opts)?;
        x + y
    }

    /// A block on `x` whose input norm `h` is taken: the residual stream after attention, and
    /// the MLP's output still to be added to it (a decode step adds it together with the next
    /// block's norm, [`residual_norm`](Self::residual_norm)).
    #[allow(clippy::too_many_arguments)]
    fn block_parts(
        &self,
        block: &Block,
        layer: usize,
        x: &Tensor,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Kv<'_, '_>,
        opts: &ForwardOpts,
    ) -> Result<(Tensor, Tensor)> {
        let a = self.attention(&block.attn, layer, h, cos, sin, mask, kv, opts)?;
        let (x, h) = self.residual_norm(x, &a, &block.post_norm, opts)?;
        let m = &block.mlp;
        let act = match &m.gate_up {
            Some(j) if j.takes(&h, opts) => {
                let out = j.forward(&[&m.gate, &m.up], &h, layer, opts)?;
                #[cfg(feature = "cuda")]
                if let Some(gu) = out.whole.as_ref().filter(|gu| step_fused(gu, opts)) {
                    // silu(gate) * up read from the joint product in place, one launch.
                    let act = super::kernels::cuda::decode_step::swiglu_joint(gu)?;
                    return Ok((x, m.down.forward(&act, layer, opts)?));
                }
                let [g, u]: [Tensor; 2] = out
                    .parts
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("gate and up expected".into()))?;
                self.swiglu(&g, &u, opts)?
            }
            _ => {
                let g = m.gate.forward(&h, layer, opts)?;
                let u = m.up.forward(&h, layer, opts)?;
                self.swiglu(&g, &u, opts)?
            }
        };
        Ok((x, m.down.forward(&act, layer, opts)?))
    }

    fn swiglu(&self, g: &Tensor, u: &Tensor, opts: &ForwardOpts) -> Result<Tensor> {
        if gpu_fused(g, opts) {
            fused::swiglu(g, u)
        } else {
            candle_nn::ops::silu(g)? * u
        }
    }

    /// `x + a` and its RMS norm by `w`: one launch in an inference pass on a GPU
    /// (`cuda::decode_step::add_rms_norm`), the add and [`norm_with`](Self::norm_with)
    /// elsewhere.
    fn residual_norm(
        &self,
        x: &Tensor,
        a: &Tensor,
        w: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if step_fused(x, opts) && x.dtype() == self.work_dtype(false) && a.dtype() == x.dtype() {
            let w = w.to_dtype(x.dtype())?;
            return super::kernels::cuda::decode_step::add_rms_norm(
                x,
                a,
                &w,
                self.cfg.rms_norm_eps,
            );
        }
        let x = (x + a)?;
        let h = self.norm_with(&x, w, opts)?;
        Ok((x, h))
    }

    /// A device step's q, k and v from the joint product `j` of `x`, each part's low-rank
    /// delta added, rotated, and k and v written at each row's position, in one launch
    /// (`cuda::decode_step::rope_cache_write`), where the LoRA adds would be a launch each.
    /// `None` where that does not serve (no adapter, biases, a delta's factors the kernel
    /// does not take, more rows than the LoRA kernel's): the ordinary step runs.
    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn rope_write_deltas(
        &self,
        a: &Attention,
        j: &Joint,
        rows: &CacheRows,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        opts: &ForwardOpts,
    ) -> Result<Option<Tensor>> {
        use super::kernels::cuda::{decode_step::PartDelta, lora};
        let Some(adapter) = opts.adapter else {
            return Ok(None);
        };
        let projs = [&a.q, &a.k, &a.v];
        if opts.composed_ops || !lora::applies(x) || projs.iter().any(|p| p.linear.bias().is_some())
        {
            return Ok(None);
        }
        let n = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let (inp, d) = (x.dim(D::Minus1)?, a.head_dim);
        let outs = [a.n_heads * d, a.n_kv * d, a.n_kv * d];
        let [fq, fk, fv] = projs.map(|p| adapter.row_factors(layer, p.target, x));
        let factors = [fq?, fk?, fv?];
        let deltas = factors.each_ref().map(|f| {
            f.as_ref().map(|f| {
                let (a, b, scales, scale) = f.parts();
                PartDelta {
                    a,
                    b,
                    scales,
                    scale,
                }
            })
        });
        let fits = deltas
            .iter()
            .zip(outs)
            .all(|(p, o)| p.as_ref().is_none_or(|p| p.fits(n, inp, o, x.dtype())));
        // The parts come out in x's dtype: whether the write serves is known before the product.
        if !fits || deltas.iter().all(Option::is_none) || !rows.rope_writes(&[x, cos, sin]) {
            return Ok(None);
        }
        // A part without factors takes its delta (if any) as the ordinary step adds it.
        let parts = projs
            .iter()
            .zip(j.views(&j.product(x)?)?)
            .zip(&deltas)
            .map(|((p, part), delta)| match delta {
                Some(_) => Ok(part),
                None => match adapter.delta(layer, p.target, x)? {
                    Some(d) => part + d,
                    None => Ok(part),
                },
            })
            .collect::<Result<Vec<_>>>()?;
        let [q, k, v] = [&parts[0], &parts[1], &parts[2]];
        rows.rope_write_lora(q, k, v, cos, sin, a.n_heads, Some((x, deltas)))
            .map(Some)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        a: &Attention,
        layer: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        kv: Kv<'_, '_>,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // Training passes attend in f32 (f64 for f64 weights); inference passes in the work
        // dtype, which the cache keeps too.
        let acc = self.work_dtype(opts.differentiable);
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            y.reshape((b, t, heads, a.head_dim))?
                .transpose(1, 2)?
                .to_dtype(acc)?
                .contiguous()
        };
        let cos = &cos.to_dtype(acc)?;
        let sin = &sin.to_dtype(acc)?;
        // The same with the adapter's low-rank deltas on q, k and v added in that launch too.
        #[cfg(feature = "cuda")]
        if let (Kv::At(rows), Some(j)) = (&kv, &a.qkv) {
            if t == 1 && j.takes(x, opts) && step_fused(x, opts) {
                if let Some(q) = self.rope_write_deltas(a, j, rows, layer, x, cos, sin, opts)? {
                    let y = rows.attend(&q, attn_scale(a))?;
                    return self.attention_output(a, layer, y, opts);
                }
            }
        }
        let (q, k, v) = match &a.qkv {
            Some(j) if j.takes(x, opts) => {
                let mut qkv = j
                    .forward(&[&a.q, &a.k, &a.v], x, layer, opts)?
                    .parts
                    .into_iter();
                let mut next = || qkv.next().expect("q, k, v");
                (next(), next(), next())
            }
            _ => (
                a.q.forward(x, layer, opts)?,
                a.k.forward(x, layer, opts)?,
                a.v.forward(x, layer, opts)?,
            ),
        };
        // A step on device positions on a GPU: q, k and v read where the projections left
        // them, rotated, k and v written into the caches, in one launch.
        #[cfg(feature = "cuda")]
        if let Kv::At(rows) = &kv {
            if t == 1 && step_fused(&q, opts) {
                if let Some(q) = rows.rope_write(&q, &k, &v, cos, sin, a.n_heads)? {
                    let y = rows.attend(&q, attn_scale(a))?;
                    return self.attention_output(a, layer, y, opts);
                }
            }
        }
        let q = split(q, a.n_heads)?;
        let k = split(k, a.n_kv)?;
        let v = split(v, a.n_kv)?;
        let gpu = gpu_fused(&q, opts);
        let (q, k) = if gpu && acc == DType::F32 {
            (fused::rope(&q, cos, sin)?, fused::rope(&k, cos, sin)?)
        } else if opts.differentiable {
            (
                candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
            )
        } else {
            (
                candle_nn::rotary_emb::rope(&q, cos, sin)?,
                candle_nn::rotary_emb::rope(&k, cos, sin)?,
            )
        };
        let y = match kv {
            Kv::One(cache) => {
                let (k, v) = match cache {
                    Some(c) => c.append(&k, &v)?,
                    None => (k, v),
                };
                // One new position (a decode step): the fused kernel, as in a batched step.
                let kv = [(k, v)];
                let fused = !opts.differentiable && !opts.composed_ops;
                if t == 1 && b == 1 && fused && decode_attention::applies(&q, &kv) {
                    decode_attention::attend_rows(&q, &kv, attn_scale(a))?
                } else {
                    let [(k, v)] = kv;
                    let softmax = match (opts.differentiable, gpu && acc == DType::F32) {
                        (true, true) => Softmax::Fused,
                        (true, false) => Softmax::Composed,
                        (false, _) => Softmax::Inference,
                    };
                    attend(a, &q, &k, &v, mask, acc, softmax)?
                }
            }
            Kv::At(rows) => {
                rows.write(&k, &v)?;
                rows.attend(&q, attn_scale(a))?
            }
            // Each row against its own cache: the one part of a batched step that is per
            // sequence (the projections around it run once for every row).
            Kv::Rows(caches) => {
                let kv = caches
                    .iter_mut()
                    .enumerate()
                    .map(|(i, c)| c.layers[layer].append(&k.narrow(0, i, 1)?, &v.narrow(0, i, 1)?))
                    .collect::<Result<Vec<_>>>()?;
                if !opts.composed_ops && decode_attention::applies(&q, &kv) {
                    decode_attention::attend_rows(&q, &kv, attn_scale(a))?
                } else {
                    let rows = kv
                        .iter()
                        .enumerate()
                        .map(|(i, (k, v))| {
                            attend(a, &q.narrow(0, i, 1)?, k, v, None, acc, Softmax::Inference)
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&rows, 0)?
                }
            }
        };
        self.attention_output(a, layer, y, opts)
    }

    /// The output projection of attention's `y` (`(b, heads, t, head_dim)`).
    fn attention_output(
        &self,
        a: &Attention,
        layer: usize,
        y: Tensor,
        opts: &ForwardOpts,
    ) -> Result<Tensor> {
        let (b, _, t, _) = y.dims4()?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, a.n_heads * a.head_dim))?
            .to_dtype(self.dtype)?;
        a.o.forward(&y, layer, opts)
    }
}

/// Softmax attention of `q` (`(b, heads, t, d)`) over `k`, `v` (`(b, kv_heads, len, d)`),
/// `(b, heads, t, d)` out. Grouped-query attention over K and V where they lie (in the cache,
/// its own buffer): the query heads sharing a KV head are rows of one product, so no step
/// copies the cache once per query head, as repeating the KV heads would.
fn attn_scale(a: &Attention) -> f64 {
    1.0 / (a.head_dim as f64).sqrt()
}

/// Which softmax a pass's attention takes.
#[derive(Clone, Copy)]
enum Softmax {
    /// candle's fused kernel, which cuts the autograd graph.
    Inference,
    /// candle's composed ops, with a backward.
    Composed,
    /// One op with a backward (`fused::softmax_last_dim`; a differentiable pass on a GPU).
    Fused,
}

fn attend(
    a: &Attention,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    acc: DType,
    softmax: Softmax,
) -> Result<Tensor> {
    let (b, _, t, _) = q.dims4()?;
    let rep = a.n_heads / a.n_kv;
    let scale = attn_scale(a);
    // Scaling q (t x d) is cheaper than scaling the scores (t x t).
    let q = (q * scale)?.reshape((b, a.n_kv, rep * t, a.head_dim))?;
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(acc)?)?;
    }
    let probs = match softmax {
        Softmax::Inference => candle_nn::ops::softmax_last_dim(&scores)?,
        Softmax::Composed => candle_nn::ops::softmax(&scores, D::Minus1)?,
        Softmax::Fused => fused::softmax_last_dim(&scores)?,
    };
    probs.matmul(v)?.reshape((b, a.n_heads, t, a.head_dim))
}

/// `(group * t, offset + t)` additive mask: 0 where a query may attend, -inf above the
/// diagonal; row `r * t + i` is query `i`, once for each of the `group` query heads that share
/// a KV head (attention's rows). `None` for a single new position, which may attend to
/// everything cached.
fn causal_mask(t: usize, offset: usize, group: usize, device: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    if device.is_cpu() {
        return host_mask(t, offset, group, device).map(Some);
    }
    // Off the CPU the mask is built where it is used (a prompt chunk's is megabytes the host
    // would fill and upload), and kept for the next pass of the same shape on this thread:
    // a training pass asks for it once per block.
    remembered((t, offset, group), device, || {
        device_mask(t, offset, group, device)
    })
    .map(Some)
}

/// The mask of `key` on `device`: this thread's last one if it is that, else `build`'s, kept.
fn remembered(
    key: MaskShape,
    device: &Device,
    build: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    LAST_MASK.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((k, m)) = last.as_ref() {
            if *k == key && m.device().same_device(device) {
                return Ok(m.clone());
            }
        }
        let m = build()?;
        *last = Some((key, m.clone()));
        Ok(m)
    })
}

/// A causal mask's `(t, offset, group)`.
type MaskShape = (usize, usize, usize);

thread_local! {
    /// The last causal mask built off the CPU on this thread.
    static LAST_MASK: std::cell::RefCell<Option<(MaskShape, Tensor)>> =
        const { std::cell::RefCell::new(None) };
}

/// [`causal_mask`] filled on the host.
fn host_mask(t: usize, offset: usize, group: usize, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let data: Vec<f32> = (0..group * t)
        .map(|row| row % t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (group * t, total), device)
}

/// [`causal_mask`] built by ops on `device`: the same values, a few launches and no upload
/// but two scalars.
fn device_mask(t: usize, offset: usize, group: usize, device: &Device) -> Result<Tensor> {
    let total = offset + t;
    let query = Tensor::arange(offset as u32, total as u32, device)?.reshape((t, 1))?;
    let key = Tensor::arange(0u32, total as u32, device)?.reshape((1, total))?;
    let future = key.broadcast_gt(&query)?;
    let value = |v: f32| Tensor::new(v, device)?.broadcast_as((t, total));
    let mask = future.where_cond(&value(f32::NEG_INFINITY)?, &value(0.0)?)?;
    mask.unsqueeze(0)?
        .broadcast_as((group, t, total))?
        .reshape((group * t, total))
}

/// Cos/sin tables for the HF ("rotate half") RoPE layout, `(max_pos, head_dim / 2)`, f32.
fn rope_tables(cfg: &ModelConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let hd = cfg.head_dim();
    let inv: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / hd as f32))
        .collect();
    let n = cfg.max_position_embeddings;
    let inv = Tensor::from_vec(inv, (1, hd / 2), device)?;
    let pos = Tensor::arange(0u32, n as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((n, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

#[cfg(test)]
mod tests;
