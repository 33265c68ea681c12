//! `ttarag bench --kernels`: each of the device's own kernels against the composed candle ops
//! it replaces, on the same device and inputs: the largest difference, then the time of both.
//! On a CUDA machine this is the parity check to run before trusting a GPU figure; on the CPU
//! it checks the CPU counterparts the same way.

use std::cell::RefCell;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::adapt::{global_norm, FastAdamW, Lora, LoraConfig};
use crate::model::{Cache, Decoder, ForwardOpts, StepGraph};

/// One kernel's check.
#[derive(Debug)]
pub struct KernelCheck {
    pub kernel: String,
    /// The implementation that ran (`cpu`, `cuda`, `candle`, or `graph`: a replayed CUDA graph).
    pub path: &'static str,
    pub max_diff: f64,
    pub tolerance: f64,
    /// Median milliseconds of one step: the kernel's, then the composed reference's.
    pub kernel_ms: f64,
    pub reference_ms: f64,
}

impl KernelCheck {
    pub fn ok(&self) -> bool {
        self.max_diff.is_finite() && self.max_diff <= self.tolerance
    }
}

/// The optimiser over tensors of `shapes` in `dtype` on `dev`: `steps` steps of
/// `FastAdamW::step_clipped` (clipping active on every other step) against candle_nn::AdamW on
/// f32 copies with the gradients clipped on the host.
pub fn optimizer(
    name: &str,
    shapes: &[Vec<usize>],
    dtype: DType,
    dev: &Device,
    steps: usize,
) -> anyhow::Result<KernelCheck> {
    let p = ParamsAdamW {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let init = shapes
        .iter()
        .map(|s| Tensor::randn(0f32, 0.05, s.as_slice(), dev))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let vars = init
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let refs = init
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut fast = FastAdamW::new(vars.clone(), p.clone())?;
    let mut reference = AdamW::new(refs.clone(), p)?;
    let (mut kernel_ms, mut reference_ms) = (vec![], vec![]);
    for step in 0..steps {
        let grads = init
            .iter()
            .map(|t| t.randn_like(0.0, 1.0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let grads_dt = grads
            .iter()
            .map(|g| g.to_dtype(dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // The reference sees the gradients the kernel sees (rounded to `dtype`).
        let grads_ref = grads_dt
            .iter()
            .map(|g| g.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = global_norm(&grads_ref)?;
        let clip = if step % 2 == 0 { norm / 2.0 } else { 0.0 };
        kernel_ms.push(time_ms(dev, || fast.step_clipped(&grads_dt, clip))?);
        reference_ms.push(time_ms(dev, || {
            let scale = if clip > 0.0 && norm > clip {
                clip / (norm + 1e-6)
            } else {
                1.0
            };
            let mut store = candle_core::backprop::GradStore::default();
            for (v, g) in refs.iter().zip(&grads_ref) {
                store.insert(v.as_tensor(), (g * scale)?);
            }
            reference.step(&store)
        })?);
    }
    let mut max_diff = 0f64;
    for (v, r) in vars.iter().zip(&refs) {
        let d = (v.as_tensor().to_dtype(DType::F32)? - r.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        max_diff = max_diff.max(d as f64);
    }
    // f32: rounding only; bf16: half a unit in the last place of weights of about 0.2.
    let tolerance = if dtype == DType::BF16 { 2e-3 } else { 1e-5 };
    Ok(KernelCheck {
        kernel: format!("{name} ({} tensors, {dtype:?})", shapes.len()),
        path: fast.path(),
        max_diff,
        tolerance,
        kernel_ms: crate::numeric::median(&kernel_ms),
        reference_ms: crate::numeric::median(&reference_ms),
    })
}

/// Largest |a - b| over the largest |b|.
fn rel_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let m = b.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    Ok(d / m.max(f64::MIN_POSITIVE))
}

/// Milliseconds of one run of `f`, with the device synchronised before and after.
fn time_ms<T>(
    dev: &Device,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<f64> {
    dev.synchronize()?;
    let t = Instant::now();
    f()?;
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

type Parts<'a> = &'a dyn Fn() -> candle_core::Result<Vec<Tensor>>;

/// `kernel` against `reference`, each run `steps` times, alternately, and timed; then their
/// parts compared one by one: the largest relative difference (NaN where one gives parts the
/// other lacks).
fn compare(
    kernel_name: String,
    dev: &Device,
    tolerance: f64,
    steps: usize,
    kernel: Parts,
    reference: Parts,
) -> anyhow::Result<KernelCheck> {
    let (mut kernel_ms, mut reference_ms) = (vec![], vec![]);
    for _ in 0..steps {
        kernel_ms.push(time_ms(dev, kernel)?);
        reference_ms.push(time_ms(dev, reference)?);
    }
    let (got, want) = (kernel()?, reference()?);
    let mut max_diff = if got.len() == want.len() {
        0f64
    } else {
        f64::NAN
    };
    for (g, w) in got.iter().zip(&want) {
        max_diff = max_diff.max(rel_diff(g, w)?);
    }
    Ok(KernelCheck {
        kernel: kernel_name,
        path: if dev.is_cpu() { "cpu" } else { "cuda" },
        max_diff,
        tolerance,
        kernel_ms: crate::numeric::median(&kernel_ms),
        reference_ms: crate::numeric::median(&reference_ms),
    })
}

/// f32: rounding; bf16: a few units in the last place of 8 bits.
fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        2e-2
    } else {
        1e-4
    }
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

/// A differentiable op, fused against composed, on `inputs` (each flagged trainable): the
/// output and the gradient of `sum(op(inputs) * r)` for every trainable input, and the time
/// of a forward and backward of each.
fn op_check(
    name: &str,
    inputs: &[(Tensor, bool)],
    steps: usize,
    fused: Op,
    composed: Op,
) -> anyhow::Result<KernelCheck> {
    let x = &inputs[0].0;
    let (dev, dtype) = (x.device().clone(), x.dtype());
    let vars = inputs
        .iter()
        .map(|(t, train)| match train {
            true => Ok(Var::from_tensor(t)?.as_tensor().clone()),
            false => Ok(t.clone()),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let r = x.randn_like(0.0, 1.0)?;
    // The output, then the gradients the op gave (a missing one leaves the parts short).
    let run = |f: Op| -> candle_core::Result<Vec<Tensor>> {
        let y = f(&vars)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let trained = vars.iter().zip(inputs).filter(|(_, (_, train))| *train);
        let mut parts = vec![y.clone()];
        parts.extend(trained.filter_map(|(v, _)| grads.get(v).cloned()));
        Ok(parts)
    };
    let name = format!("{name} ({:?}, {dtype:?}, relative)", x.dims());
    compare(name, &dev, tolerance(dtype), steps, &|| run(fused), &|| {
        run(composed)
    })
}

/// The fused RMS norm (f32, as training takes norms), SwiGLU (f32, and bf16 off the CPU),
/// rotary embedding, attention, the LoRA delta and causal softmax over `rows` positions of `dec`'s widths, each a batch
/// of one sequence as the decoder's passes have it.
pub fn block_ops(dec: &Decoder, rows: usize, steps: usize) -> anyhow::Result<Vec<KernelCheck>> {
    use crate::model::fused;
    let dev = dec.device();
    let cfg = dec.config();
    let eps = cfg.rms_norm_eps;
    let randn =
        |shape: &[usize], std: f32, dtype| Tensor::randn(0f32, std, shape, dev)?.to_dtype(dtype);
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let dtypes: &[DType] = if dev.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    let mut out = vec![];
    for &dtype in dtypes {
        out.push(op_check(
            "rms norm fwd+bwd",
            &[
                (randn(&[1, rows, h], 1.0, dtype)?, true),
                ((randn(&[h], 0.5, dtype)? + 1.0)?, true),
            ],
            steps,
            &|t| fused::rms_norm(&t[0], &t[1], eps),
            &|t| candle_nn::ops::rms_norm_slow(&t[0], &t[1], eps as f32),
        )?);
    }
    for &dtype in dtypes {
        out.push(op_check(
            "swiglu fwd+bwd",
            &[
                (randn(&[1, rows, i], 1.0, dtype)?, true),
                (randn(&[1, rows, i], 0.5, dtype)?, true),
            ],
            steps,
            &|t| fused::swiglu(&t[0], &t[1]),
            &|t| candle_nn::ops::silu(&t[0])? * &t[1],
        )?);
    }
    // Attention's rotary embedding of the queries and its softmax over causal scores.
    let (heads, d) = (cfg.num_attention_heads, cfg.head_dim());
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / (cfg.rope_theta as f32).powf(2.0 * i as f32 / d as f32))
        .collect();
    let angles = Tensor::arange(0u32, rows as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((rows, 1))?
        .broadcast_mul(&Tensor::from_vec(inv, (1, d / 2), dev)?)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    out.push(op_check(
        "rope fwd+bwd",
        &[(randn(&[1, heads, rows, d], 1.0, DType::F32)?, true)],
        steps,
        &|t| fused::rope(&t[0], &cos, &sin),
        &|t| candle_nn::rotary_emb::rope_slow(&t[0], &cos, &sin),
    )?);
    // The whole attention with its rotary embedding, one op each way, against candle's
    // composed path (heads split, rotated, kv heads repeated, masked softmax, two products).
    let kv_heads = cfg.num_key_value_heads;
    let causal: Vec<f32> = (0..rows * rows)
        .map(|i| {
            if i % rows > i / rows {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(causal, (rows, rows), dev)?;
    let composed_attention = |t: &[Tensor]| -> candle_core::Result<Tensor> {
        let (rep, scale) = (heads / kv_heads, 1.0 / (d as f64).sqrt());
        let split =
            |x: &Tensor, n: usize| x.reshape((1, rows, n, d))?.transpose(1, 2)?.contiguous();
        let repeat = |x: Tensor| {
            x.unsqueeze(2)?
                .broadcast_as((1, kv_heads, rep, rows, d))?
                .reshape((1, heads, rows, d))
        };
        // In f32 whatever the operands hold, as the kernels compute.
        let f32 = |x: &Tensor| x.to_dtype(DType::F32);
        let q = candle_nn::rotary_emb::rope_slow(&split(&f32(&t[0])?, heads)?, &cos, &sin)?;
        let k = repeat(candle_nn::rotary_emb::rope_slow(
            &split(&f32(&t[1])?, kv_heads)?,
            &cos,
            &sin,
        )?)?;
        let v = repeat(split(&f32(&t[2])?, kv_heads)?)?;
        let scores = (q * scale)?.matmul(&k.t()?)?.broadcast_add(&mask)?;
        let p = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?;
        p.matmul(&v)?
            .transpose(1, 2)?
            .reshape((1, rows, heads * d))?
            .to_dtype(t[0].dtype())
    };
    // The op runs where its inputs lie: the GPU's body whatever cuda_fused_training says.
    for &dtype in dtypes {
        out.push(op_check(
            "causal attention with rotary fwd+bwd",
            &[
                (randn(&[1, rows, heads * d], 1.0, dtype)?, true),
                (randn(&[1, rows, kv_heads * d], 1.0, dtype)?, true),
                (randn(&[1, rows, kv_heads * d], 1.0, dtype)?, true),
            ],
            steps,
            &|t| fused::causal_attention(&t[0], &t[1], &t[2], heads, kv_heads, &cos, &sin),
            &composed_attention,
        )?);
    }
    // A LoRA delta of the default rank on the query projection: one op each way against two
    // broadcast products and a scale (the composed delta, `Lora::delta` off the fused path).
    let rank = crate::adapt::LoraConfig::default().rank;
    for &dtype in dtypes {
        out.push(op_check(
            "lora delta fwd+bwd",
            &[
                (randn(&[1, rows, h], 1.0, dtype)?, true),
                (randn(&[rank, h], 0.1, dtype)?, true),
                (randn(&[heads * d, rank], 0.1, dtype)?, true),
            ],
            steps,
            &|t| fused::lora_delta(&t[0], &t[1], &t[2], 2.0),
            &|t| {
                t[0].broadcast_matmul(&t[1].t()?)?
                    .broadcast_matmul(&t[2].t()?)?
                    * 2.0
            },
        )?);
    }
    let scores = randn(&[1, heads, rows, rows], 3.0, DType::F32)?.broadcast_add(&mask)?;
    out.push(op_check(
        "causal softmax fwd+bwd",
        &[(scores, true)],
        steps,
        &|t| fused::softmax_last_dim(&t[0]),
        &|t| candle_nn::ops::softmax(&t[0], candle_core::D::Minus1),
    )?);
    Ok(out)
}

/// A decode step's attention (`rows` sequences over caches of about `len` positions, in
/// `dtype`) by the device's kernel against the composed candle ops, grouped-query as the
/// decoder attends.
pub fn decode_attention(
    dec: &Decoder,
    rows: usize,
    len: usize,
    dtype: DType,
    steps: usize,
) -> anyhow::Result<KernelCheck> {
    let (dev, cfg) = (dec.device(), dec.config());
    let (heads, kv_heads, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let scale = 1.0 / (d as f64).sqrt();
    let q = Tensor::randn(0f32, 1.0, (rows, heads, 1, d), dev)?.to_dtype(dtype)?;
    // Views into larger buffers, as caches are; lengths differ by row.
    let kv = (0..rows)
        .map(|r| {
            let n = len + 7 * r;
            let buf = |_| Tensor::randn(0f32, 1.0, (1, kv_heads, n + 16, d), dev)?.to_dtype(dtype);
            let (k, v) = (buf(0)?, buf(1)?);
            Ok((k.narrow(2, 0, n)?, v.narrow(2, 0, n)?))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let composed = || -> candle_core::Result<Vec<Tensor>> {
        let rep = heads / kv_heads;
        let rows = kv
            .iter()
            .enumerate()
            .map(|(r, (k, v))| {
                let qr = (q.narrow(0, r, 1)? * scale)?.reshape((1, kv_heads, rep, d))?;
                let p = candle_nn::ops::softmax_last_dim(&qr.matmul(&k.t()?)?)?;
                p.matmul(v)?.reshape((1, heads, 1, d))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(vec![Tensor::cat(&rows, 0)?])
    };
    let name = format!("decode attention ({rows} rows, ~{len} positions, {dtype:?}, relative)");
    if !crate::model::decode_attention::applies(&q, &kv) {
        // No kernel here: the composed ops' time alone.
        let times = (0..steps)
            .map(|_| time_ms(dev, composed))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return Ok(KernelCheck {
            kernel: name,
            path: "candle",
            max_diff: f64::NAN,
            tolerance: tolerance(dtype),
            kernel_ms: f64::NAN,
            reference_ms: crate::numeric::median(&times),
        });
    }
    let kernel = || {
        Ok(vec![crate::model::decode_attention::attend_rows(
            &q, &kv, scale,
        )?])
    };
    compare(name, dev, tolerance(dtype), steps, &kernel, &composed)
}

/// `n` LoRA r8 q,v adapters of `dec`'s shapes in `dtype`, each with a random B, as a trained
/// adapter has (a fresh one's B is zero, and its delta nothing).
fn trained_loras(dec: &Decoder, n: usize, dtype: DType) -> candle_core::Result<Vec<Lora>> {
    let cfg = LoraConfig::default();
    let dev = dec.device();
    let loras = (0..n)
        .map(|i| Lora::new(dec.config(), &cfg, i as u64 + 1, dev, dtype))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for l in &loras {
        for v in l.vars() {
            if v.dims()[1] == cfg.rank {
                v.set(&Tensor::randn(0f32, 0.05, v.dims(), dev)?.to_dtype(dtype)?)?;
            }
        }
    }
    Ok(loras)
}

/// A step graph's LoRA stacks restacked in place for a new batch composition (all `rows`
/// rows change adapter, every projection's stacks, rank 8, in `dtype`; on a GPU one launch,
/// `Gathered::restack`) against stacking them afresh, what every change of a batch's rows
/// cost before step graphs had slots. Parts: the first and last layers' stacked factors and
/// scales, which must be equal.
pub fn restack(
    dec: &Decoder,
    rows: usize,
    dtype: DType,
    steps: usize,
) -> anyhow::Result<KernelCheck> {
    use crate::model::{Adapter, Gathered, PerRow, RowFactors, Target};
    let dev = dec.device();
    let layers = dec.config().num_hidden_layers;
    let loras = trained_loras(dec, 3 * rows, dtype)?;
    // Composition `c` is adapters `c * rows..(c + 1) * rows`: the held stacks start as 2's,
    // and each timed restack alternates between 0 and 1, so every one copies every row.
    let batch = |c: usize| -> Vec<Option<&dyn Adapter>> {
        (0..rows)
            .map(|i| Some(&loras[c * rows + i] as &dyn Adapter))
            .collect()
    };
    let x = Tensor::zeros((rows, 1, 1), dtype, dev)?;
    // Every projection's stacks, as a batch's first step makes them.
    let stack_all = |g: &Gathered, c: usize| -> candle_core::Result<()> {
        let per_row = PerRow::with_cache(batch(c), g);
        for l in 0..layers {
            for t in Target::ALL {
                per_row.row_factors(l, t, &x)?;
            }
        }
        Ok(())
    };
    let parts = |g: &Gathered, c: usize| -> candle_core::Result<Vec<Tensor>> {
        let per_row = PerRow::with_cache(batch(c), g);
        let mut out = vec![];
        for l in [0, layers - 1] {
            for t in Target::ALL {
                if let Some(RowFactors::Stacked { a, b, scales }) = per_row.row_factors(l, t, &x)? {
                    out.extend([a, b, scales]);
                }
            }
        }
        Ok(out)
    };
    let held = Gathered::default();
    stack_all(&held, 2)?;
    anyhow::ensure!(held.entries() > 0, "the adapters have no factors to stack");
    let now = std::cell::Cell::new(0);
    let kernel = || -> candle_core::Result<Vec<Tensor>> {
        now.set(1 - now.get());
        held.restack(&batch(now.get()), layers)?;
        parts(&held, now.get())
    };
    let afresh = || -> candle_core::Result<Vec<Tensor>> {
        let g = Gathered::default();
        stack_all(&g, now.get())?;
        parts(&g, now.get())
    };
    let name = format!("lora restack ({rows} rows, every projection, rank 8, {dtype:?})");
    compare(name, dev, 0.0, steps, &kernel, &afresh)
}

/// The greedy pick of `rows` rows of logits of `dec`'s vocabulary in `dtype`, against what a
/// step did per row before it: the sampler's argmax and the host log-probability over a copy
/// of the row (parts: the tokens and the log-probabilities, on the host); and the pick without
/// log-probabilities (what the scheduler's answers take) against with them: the same tokens,
/// and on the CPU the time the log-softmax cost.
pub fn greedy_picks(
    dec: &Decoder,
    rows: usize,
    dtype: DType,
    steps: usize,
) -> anyhow::Result<[KernelCheck; 2]> {
    use candle_transformers::generation::{LogitsProcessor, Sampling};
    let dev = dec.device();
    let vocab = dec.config().vocab_size;
    let logits = (Tensor::randn(0f32, 1.0, (rows, vocab), dev)? * 5.0)?.to_dtype(dtype)?;
    let parts = |picks: Vec<crate::model::Pick>| -> candle_core::Result<Vec<Tensor>> {
        let tokens: Vec<f64> = picks.iter().map(|p| p.token as f64).collect();
        let logprobs: Vec<f64> = picks.iter().map(|p| p.logprob).collect();
        Ok(vec![
            Tensor::new(tokens, &Device::Cpu)?,
            Tensor::new(logprobs, &Device::Cpu)?,
        ])
    };
    let kernel = || parts(crate::model::greedy_picks(&logits, true)?);
    let per_row = || -> candle_core::Result<Vec<Tensor>> {
        let mut picks = vec![];
        for r in 0..rows {
            let row = logits.get(r)?;
            let token = LogitsProcessor::from_sampling(0, Sampling::ArgMax).sample(&row)?;
            let host = row.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let logprob = crate::model::logprob_at(&host, token as usize);
            picks.push(crate::model::Pick { token, logprob });
        }
        parts(picks)
    };
    let tokens = |logprobs: bool| -> candle_core::Result<Vec<Tensor>> {
        let picks = crate::model::greedy_picks(&logits, logprobs)?;
        let t: Vec<f64> = picks.iter().map(|p| p.token as f64).collect();
        Ok(vec![Tensor::new(t, &Device::Cpu)?])
    };
    let shape = format!("{rows} rows x {vocab}, {dtype:?}, relative");
    Ok([
        compare(
            format!("greedy pick ({shape})"),
            dev,
            1e-6,
            steps,
            &kernel,
            &per_row,
        )?,
        compare(
            format!("greedy tokens only ({shape})"),
            dev,
            0.0,
            steps,
            &|| tokens(false),
            &|| tokens(true),
        )?,
    ])
}

/// The LoRA-add kernel against the composed delta: `rows` sequences of `positions` (a decode
/// step's rows, or a prefill chunk's positions) of the hidden width, one adapter shared
/// (`rows` = 1) or one per row (gathered), rank 8, in `dtype`.
#[cfg(feature = "cuda")]
pub fn lora_add(
    dec: &Decoder,
    rows: usize,
    positions: usize,
    dtype: DType,
    steps: usize,
) -> anyhow::Result<KernelCheck> {
    use crate::model::{Adapter, Gathered, PerRow, Target};
    let dev = dec.device();
    let h = dec.config().hidden_size;
    let loras = trained_loras(dec, rows, dtype)?;
    let adapters: Vec<Option<&dyn Adapter>> =
        loras.iter().map(|l| Some(l as &dyn Adapter)).collect();
    let cache = Gathered::default();
    let per_row = PerRow::with_cache(adapters, &cache);
    let adapter: &dyn Adapter = if rows == 1 { &loras[0] } else { &per_row };
    let x = Tensor::randn(0f32, 1.0, (rows, positions, h), dev)?.to_dtype(dtype)?;
    // The projection's output as a part of a joint product, read where it lies.
    let y = Tensor::randn(0f32, 1.0, (rows, positions, 2 * h), dev)?
        .to_dtype(dtype)?
        .narrow(2, h, h)?;
    let kernel = || -> candle_core::Result<Vec<Tensor>> {
        let missing = || candle_core::Error::Msg("the kernel did not take the factors".into());
        let f = adapter.row_factors(0, Target::Q, &x)?.ok_or_else(missing)?;
        let (a, b, scales, scale) = f.parts();
        let added = crate::model::cuda::lora::add(&y, &x, a, b, scales, scale)?;
        Ok(vec![added.ok_or_else(missing)?])
    };
    let composed = || -> candle_core::Result<Vec<Tensor>> {
        let d = adapter.delta(0, Target::Q, &x)?.expect("a delta on q");
        Ok(vec![(&y + d)?])
    };
    let name =
        format!("lora add ({rows} rows x {positions} positions, rank 8, {dtype:?}, relative)");
    compare(name, dev, tolerance(dtype), steps, &kernel, &composed)
}

/// A decode step's fused neighbours (`cuda::decode_step`) against the composed ops the
/// decoder runs without them, `rows` rows of `dec`'s widths in `dtype`: the residual add with
/// the next RMS norm, SwiGLU read from the joint gate/up product, and the rotary embedding
/// with the cache write (q, k and v read as strided parts of one joint product, each row
/// writing at its own position of its own cache).
#[cfg(feature = "cuda")]
pub fn decode_fusions(
    dec: &Decoder,
    rows: usize,
    dtype: DType,
    steps: usize,
) -> anyhow::Result<Vec<KernelCheck>> {
    use crate::model::cache_rows::CacheRows;
    use crate::model::cuda::decode_step;
    let (dev, cfg) = (dec.device(), dec.config());
    let randn = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, dev)?.to_dtype(dtype);
    let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
    let (x, a, w) = (
        randn(&[rows, 1, h], 1.0)?,
        randn(&[rows, 1, h], 1.0)?,
        (randn(&[h], 0.2)? + 1.0)?,
    );
    let mut out = vec![compare(
        format!("add + rms norm ({rows} rows, {dtype:?}, relative)"),
        dev,
        tolerance(dtype),
        steps,
        &|| {
            let (s, n) = decode_step::add_rms_norm(&x, &a, &w, eps)?;
            Ok(vec![s, n])
        },
        &|| {
            let s = (&x + &a)?;
            let n = candle_nn::ops::rms_norm(&s, &w, eps as f32)?;
            Ok(vec![s, n])
        },
    )?];
    let gu = randn(&[rows, 1, 2 * i], 1.0)?;
    out.push(compare(
        format!("swiglu joint ({rows} rows, {dtype:?}, relative)"),
        dev,
        tolerance(dtype),
        steps,
        &|| Ok(vec![decode_step::swiglu_joint(&gu)?]),
        &|| {
            let (g, u) = (gu.narrow(2, 0, i)?, gu.narrow(2, i, i)?);
            Ok(vec![(candle_nn::ops::silu(&g)? * u)?])
        },
    )?);
    // Rotary and cache write: q, k, v as views into one joint product, as the step has them.
    let (heads, kv_heads, d) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let qkv = randn(&[rows, 1, (heads + 2 * kv_heads) * d], 1.0)?;
    let (q, k, v) = (
        qkv.narrow(2, 0, heads * d)?,
        qkv.narrow(2, heads * d, kv_heads * d)?,
        qkv.narrow(2, (heads + kv_heads) * d, kv_heads * d)?,
    );
    let angles = Tensor::arange(0u32, rows as u32, dev)?
        .to_dtype(DType::F32)?
        .affine(3.0, 5.0)?
        .reshape((rows, 1, 1))?
        .broadcast_mul(&Tensor::arange(1u32, d as u32 / 2 + 1, dev)?.to_dtype(DType::F32)?)?
        .affine(0.01, 0.0)?;
    let (cos, sin) = (
        angles.cos()?.to_dtype(dtype)?,
        angles.sin()?.to_dtype(dtype)?,
    );
    let capacity = 64;
    let positions: Vec<u32> = (0..rows as u32).map(|r| (r * 7 + 3) % capacity).collect();
    let positions = Tensor::new(positions.as_slice(), dev)?;
    let caches = || -> candle_core::Result<Vec<(Tensor, Tensor)>> {
        (0..rows)
            .map(|_| {
                Ok((
                    randn(&[1, kv_heads, capacity as usize, d], 1.0)?,
                    randn(&[1, kv_heads, capacity as usize, d], 1.0)?,
                ))
            })
            .collect()
    };
    let (fused_caches, composed_caches) = (caches()?, caches()?);
    for ((a, b), (c, e)) in fused_caches.iter().zip(&composed_caches) {
        c.slice_set(a, 2, 0)?;
        e.slice_set(b, 2, 0)?;
    }
    let fused_rows = CacheRows::new(fused_caches.clone(), &positions)?;
    let composed_rows = CacheRows::new(composed_caches.clone(), &positions)?;
    let flat = |c: &[(Tensor, Tensor)]| -> Vec<Tensor> {
        c.iter().flat_map(|(k, v)| [k.clone(), v.clone()]).collect()
    };
    out.push(compare(
        format!("rope + cache write ({rows} rows, {dtype:?}, relative)"),
        dev,
        tolerance(dtype),
        steps,
        &|| {
            let missing = || candle_core::Error::Msg("the kernel did not take the step".into());
            let q = fused_rows
                .rope_write(&q, &k, &v, &cos, &sin, heads)?
                .ok_or_else(missing)?;
            let mut parts = vec![q];
            parts.extend(flat(&fused_caches));
            Ok(parts)
        },
        &|| {
            let split =
                |y: &Tensor, n: usize| y.reshape((rows, 1, n, d))?.transpose(1, 2)?.contiguous();
            let q = candle_nn::rotary_emb::rope(&split(&q, heads)?, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope(&split(&k, kv_heads)?, &cos, &sin)?;
            composed_rows.write(&k, &split(&v, kv_heads)?)?;
            let mut parts = vec![q];
            parts.extend(flat(&composed_caches));
            Ok(parts)
        },
    )?);
    Ok(out)
}

/// A whole decode step of `rows` sequences (prompts of about `len` tokens) through a
/// [`StepGraph`] (replayed from a captured graph on a GPU; on the CPU its ops one by one)
/// against [`Decoder::decode_step`], each on its own copy of the same caches, fed the same
/// tokens: the logits of the last step compared, and the time of a step of each.
pub fn decode_step(
    dec: &Decoder,
    rows: usize,
    len: usize,
    lora: bool,
    steps: usize,
) -> anyhow::Result<KernelCheck> {
    use crate::model::{Adapter, Gathered, PerRow};
    let vocab = dec.config().vocab_size as u32;
    let room = steps + 2;
    let prefilled = prefilled(dec, rows, len, room)?;
    let copies =
        || -> candle_core::Result<Vec<Cache>> { prefilled.iter().map(|c| c.fork(room)).collect() };
    let (graphed, eager) = (RefCell::new(copies()?), RefCell::new(copies()?));
    let graph = {
        let mut g = graphed.borrow_mut();
        let mut refs: Vec<&mut Cache> = g.iter_mut().collect();
        RefCell::new(StepGraph::new(dec, &mut refs, room)?)
    };
    let tokens: Vec<u32> = (0..rows as u32).map(|r| (r * 101 + 5) % vocab).collect();
    // With `lora`, each row its own adapter, gathered as the scheduler gathers them.
    let loras = match lora {
        true => trained_loras(dec, rows, dec.dtype())?,
        false => vec![],
    };
    let gathered = Gathered::default();
    let per_row = PerRow::with_cache(
        loras.iter().map(|l| Some(l as &dyn Adapter)).collect(),
        &gathered,
    );
    let opts = ForwardOpts {
        adapter: lora.then_some(&per_row as &dyn Adapter),
        ..Default::default()
    };
    let kernel = || -> candle_core::Result<Vec<Tensor>> {
        let mut g = graphed.borrow_mut();
        let mut refs: Vec<&mut Cache> = g.iter_mut().collect();
        let adapters: Vec<Option<&dyn Adapter>> = match lora {
            true => loras.iter().map(|l| Some(l as &dyn Adapter)).collect(),
            false => vec![None; rows],
        };
        Ok(vec![
            graph
                .borrow_mut()
                .step(dec, &tokens, &mut refs, &adapters)?
                .0,
        ])
    };
    let reference = || -> candle_core::Result<Vec<Tensor>> {
        let mut e = eager.borrow_mut();
        let mut refs: Vec<&mut Cache> = e.iter_mut().collect();
        Ok(vec![dec.decode_step(&tokens, &mut refs, &opts)?])
    };
    let name = format!(
        "decode step ({rows} rows{}, ~{len} positions, {:?}, relative)",
        if lora { ", own LoRAs" } else { "" },
        dec.dtype()
    );
    let mut check = compare(
        name,
        dec.device(),
        tolerance(dec.dtype()),
        steps,
        &kernel,
        &reference,
    )?;
    if let Some(n) = graph.borrow().nodes() {
        check.path = "graph";
        check.kernel = format!("{} [{n} graph nodes]", check.kernel);
    }
    Ok(check)
}

/// Sequences joining and leaving one [`StepGraph`] of 8 slots (ghost rows where fewer run;
/// captured at its first step and replayed after on a GPU, the same ops one by one on the
/// CPU), each with its own LoRA: the rows' caches rebound and the adapters' factors restacked
/// in place between steps, against [`Decoder::decode_step`] of the same rows on twin caches.
/// The largest difference over every step's logits, and the median time of a step of each.
pub fn decode_churn(dec: &Decoder, len: usize) -> anyhow::Result<KernelCheck> {
    use crate::model::{Adapter, Gathered, PerRow};
    // Which sequences decode together at each step: 2 leaves, 5 joins in its slot, the
    // order changes, 2 comes back into a ghost slot, 0 and 1 leave.
    let plan: [&[usize]; 8] = [
        &[0, 1, 2, 3, 4],
        &[0, 1, 2, 3, 4],
        &[0, 1, 3, 4],
        &[0, 1, 3, 4, 5],
        &[5, 4, 3, 1, 0],
        &[5, 4, 3, 1, 0, 2],
        &[2, 3, 4, 5],
        &[2, 3, 4, 5],
    ];
    let (n, room) = (6, plan.len() + 1);
    let vocab = dec.config().vocab_size as u32;
    let mut graphed = prefilled(dec, n, len, room)?;
    let mut eager: Vec<Cache> = graphed
        .iter()
        .map(|c| c.fork(room))
        .collect::<candle_core::Result<_>>()?;
    let loras = trained_loras(dec, n, dec.dtype())?;
    let mut graph = {
        let mut refs: Vec<&mut Cache> = graphed.iter_mut().take(plan[0].len()).collect();
        StepGraph::with_slots(dec, &mut refs, 0, 8)?
    };
    let (mut max_diff, mut kernel_ms, mut reference_ms) = (0f64, vec![], vec![]);
    for (step, rows) in plan.iter().enumerate() {
        let tokens: Vec<u32> = rows
            .iter()
            .map(|&r| (r as u32 * 101 + 5 + step as u32) % vocab)
            .collect();
        let adapters: Vec<Option<&dyn Adapter>> = rows
            .iter()
            .map(|&r| Some(&loras[r] as &dyn Adapter))
            .collect();
        let live: Vec<&Cache> = rows.iter().map(|&r| &graphed[r]).collect();
        anyhow::ensure!(
            graph.serves(&live, &adapters),
            "step {step}: the graph refused"
        );
        graph.release(&live)?;
        let mut g = pick_mut(&mut graphed, rows);
        let mut got = None;
        kernel_ms.push(time_ms(dec.device(), || {
            got = Some(graph.step(dec, &tokens, &mut g, &adapters)?.0);
            Ok(())
        })?);
        let gathered = Gathered::default();
        let per_row = PerRow::with_cache(adapters.clone(), &gathered);
        let opts = ForwardOpts {
            adapter: Some(&per_row),
            ..Default::default()
        };
        let mut e = pick_mut(&mut eager, rows);
        let mut want = None;
        reference_ms.push(time_ms(dec.device(), || {
            want = Some(dec.decode_step(&tokens, &mut e, &opts)?);
            Ok(())
        })?);
        let (got, want) = (got.expect("stepped"), want.expect("stepped"));
        max_diff = max_diff.max(rel_diff(&got, &want)?);
    }
    let dtype = dec.dtype();
    Ok(KernelCheck {
        kernel: format!(
            "decode steps, rows joining and leaving 8 slots, own LoRAs, ~{len} positions, \
             {dtype:?}, relative"
        ),
        path: match graph.captured() {
            true => "graph",
            false if dec.device().is_cpu() => "cpu",
            false => "cuda",
        },
        max_diff,
        tolerance: tolerance(dtype),
        kernel_ms: crate::numeric::median(&kernel_ms),
        reference_ms: crate::numeric::median(&reference_ms),
    })
}

/// `rows` caches, row `r` holding a prompt of `len + 7 r` tokens, each with room for `room`
/// more positions.
fn prefilled(
    dec: &Decoder,
    rows: usize,
    len: usize,
    room: usize,
) -> candle_core::Result<Vec<Cache>> {
    let vocab = dec.config().vocab_size as u32;
    (0..rows)
        .map(|r| {
            let n = len + 7 * r;
            let ids: Vec<u32> = (0..n as u32)
                .map(|i| (i * 31 + r as u32 * 7) % vocab)
                .collect();
            let mut c = dec.new_cache(n + room);
            let ids = Tensor::new(ids.as_slice(), dec.device())?.unsqueeze(0)?;
            dec.forward(&ids, Some(&mut c), &ForwardOpts::default())?;
            Ok(c)
        })
        .collect()
}

/// `rows` of `caches`, in that order, mutably.
fn pick_mut<'a>(caches: &'a mut [Cache], rows: &[usize]) -> Vec<&'a mut Cache> {
    let mut all: Vec<Option<&'a mut Cache>> = caches.iter_mut().map(Some).collect();
    rows.iter()
        .map(|&i| all[i].take().expect("each row once"))
        .collect()
}

/// Every check for `dec`'s shapes on its device: the optimiser over a LoRA r8 q,v adapter and
/// over every weight, in f32 and (off the CPU) bf16.
pub fn all(dec: &Decoder, steps: usize) -> anyhow::Result<Vec<KernelCheck>> {
    let dev = dec.device();
    let lora = Lora::new(dec.config(), &LoraConfig::default(), 0, dev, DType::F32)?;
    let lora_shapes: Vec<Vec<usize>> = lora.vars().iter().map(|v| v.dims().to_vec()).collect();
    let full_shapes: Vec<Vec<usize>> = dec
        .named_weights()
        .iter()
        .map(|(_, w)| w.dims().to_vec())
        .collect();
    let dtypes: &[DType] = if dev.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    let mut out = Vec::new();
    for &dtype in dtypes {
        out.push(optimizer("adamw lora", &lora_shapes, dtype, dev, steps)?);
        out.push(optimizer("adamw full", &full_shapes, dtype, dev, steps)?);
    }
    // About three training pairs' worth of positions.
    out.extend(block_ops(dec, 192, steps)?);
    for &dtype in dtypes {
        out.push(restack(dec, 8, dtype, steps)?);
        for rows in [1, 8] {
            out.extend(greedy_picks(dec, rows, dtype, steps)?);
            out.push(decode_attention(dec, rows, 1000, dtype, steps)?);
            #[cfg(feature = "cuda")]
            if dev.is_cuda() {
                out.push(lora_add(dec, rows, 1, dtype, steps)?);
                out.extend(decode_fusions(dec, rows, dtype, steps)?);
            }
        }
        // A prefill chunk's delta (and a loss pass's), one adapter for every position.
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            out.push(lora_add(
                dec,
                1,
                crate::generate::PREFILL_CHUNK,
                dtype,
                steps,
            )?);
        }
    }
    if dec.device_steps_serve(1000 + 7 * 8 + steps + 2) {
        for (rows, lora) in [(1, false), (8, false), (1, true), (8, true)] {
            out.push(decode_step(dec, rows, 1000, lora, steps)?);
        }
        out.push(decode_churn(dec, 1000)?);
    }
    Ok(out)
}

/// Prints the checks as a table; fails when one is outside its tolerance.
pub fn run(dec: &Decoder, steps: usize) -> anyhow::Result<()> {
    let checks = all(dec, steps)?;
    println!(
        "{:<60} {:<7} {:>10} {:>9} {:>10} {:>12}  parity",
        "kernel", "path", "max diff", "tol", "kernel ms", "candle ms"
    );
    for c in &checks {
        println!(
            "{:<60} {:<7} {:>10.2e} {:>9.0e} {:>10.3} {:>12.3}  {}",
            c.kernel,
            c.path,
            c.max_diff,
            c.tolerance,
            c.kernel_ms,
            c.reference_ms,
            if c.ok() { "ok" } else { "FAILED" }
        );
    }
    let failed = checks.iter().filter(|c| !c.ok()).count();
    anyhow::ensure!(failed == 0, "{failed} kernel check(s) outside tolerance");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny model's decoder, f32 on the CPU.
    fn tiny_decoder(arch: crate::model::Arch) -> Decoder {
        let parts = crate::model::tiny::tiny_parts(arch, 3, &Device::Cpu, DType::F32).unwrap();
        crate::model::Model::from_parts("t", parts).unwrap().decoder
    }

    #[test]
    fn the_cpu_optimiser_matches_candle_within_tolerance_and_reports_its_path() {
        let shapes = vec![vec![8, 64], vec![64, 8], vec![5000], vec![3]];
        let c = optimizer("adamw", &shapes, DType::F32, &Device::Cpu, 4).unwrap();
        assert_eq!(c.path, "cpu");
        assert!(c.ok(), "{c:?}");
        assert!(c.max_diff < 1e-5, "{c:?}");
        assert!(c.kernel_ms >= 0.0 && c.reference_ms >= 0.0);
    }

    #[test]
    fn fused_block_ops_match_their_composed_ops_in_value_and_gradients() {
        let dec = tiny_decoder(crate::model::Arch::Llama);
        let checks = block_ops(&dec, 24, 2).unwrap();
        // Norm, activation, rotary, softmax, the whole attention (the CPU's fused path) and
        // the LoRA delta (the GPU's; on the CPU its reference body).
        assert_eq!(checks.len(), 6);
        assert!(checks
            .iter()
            .any(|c| c.kernel.starts_with("causal attention")));
        for c in &checks {
            assert!(c.ok(), "{c:?}");
            assert_eq!(c.path, "cpu");
        }
    }

    #[test]
    fn decode_attention_matches_the_composed_ops_over_cache_views() {
        let dec = tiny_decoder(crate::model::Arch::Qwen2);
        for rows in [1, 3] {
            let c = decode_attention(&dec, rows, 40, DType::F32, 2).unwrap();
            assert_eq!(c.path, "cpu");
            assert!(c.ok(), "{c:?}");
        }
    }

    #[test]
    fn a_step_graph_gives_the_decode_steps_logits_bit_for_bit_on_the_cpu() {
        let dec = tiny_decoder(crate::model::Arch::Llama);
        for (rows, lora) in [(1, false), (3, false), (3, true)] {
            let c = decode_step(&dec, rows, 20, lora, 3).unwrap();
            assert_eq!(c.path, "cpu");
            assert_eq!(c.max_diff, 0.0, "{c:?}");
        }
    }

    #[test]
    fn rows_joining_and_leaving_a_step_graph_get_the_decode_steps_logits_bit_for_bit() {
        let dec = tiny_decoder(crate::model::Arch::Llama);
        let c = decode_churn(&dec, 20).unwrap();
        assert_eq!(c.path, "cpu");
        assert_eq!(c.max_diff, 0.0, "{c:?}");
    }

    #[test]
    fn restacking_in_place_gives_the_stacks_made_afresh() {
        let dec = tiny_decoder(crate::model::Arch::Llama);
        let c = restack(&dec, 3, DType::F32, 3).unwrap();
        assert_eq!(c.path, "cpu");
        assert_eq!(c.max_diff, 0.0, "{c:?}");
    }

    #[test]
    fn variables_the_fast_paths_do_not_take_go_to_candle_and_still_agree() {
        let shapes = vec![vec![100], vec![7, 9]];
        let c = optimizer("adamw", &shapes, DType::F64, &Device::Cpu, 3).unwrap();
        assert_eq!(c.path, "candle");
        assert!(c.ok(), "{c:?}");
        let nan = KernelCheck {
            max_diff: f64::NAN,
            ..c
        };
        assert!(!nan.ok(), "a NaN difference must fail the check");
    }
}
