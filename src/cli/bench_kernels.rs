//! `ttarag bench --kernels`: each of the device's own kernels against the composed candle ops
//! it replaces, on the same device and inputs: the largest difference, then the time of both.
//! On a CUDA machine this is the parity check to run before trusting a GPU figure; on the CPU
//! it checks the CPU counterparts the same way.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};

use crate::adapt::{global_norm, FastAdamW, Lora, LoraConfig};
use crate::model::Decoder;

/// One kernel's check.
#[derive(Debug)]
pub struct KernelCheck {
    pub kernel: String,
    /// The implementation that ran (`cpu`, `cuda` or `candle`).
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
        dev.synchronize()?;
        let t = Instant::now();
        fast.step_clipped(&grads_dt, clip)?;
        dev.synchronize()?;
        kernel_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let scale = if clip > 0.0 && norm > clip {
            clip / (norm + 1e-6)
        } else {
            1.0
        };
        let mut store = candle_core::backprop::GradStore::default();
        for (v, g) in refs.iter().zip(&grads_ref) {
            store.insert(v.as_tensor(), (g * scale)?);
        }
        reference.step(&store)?;
        dev.synchronize()?;
        reference_ms.push(t.elapsed().as_secs_f64() * 1e3);
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

/// A two-input differentiable op, fused against composed, on `(rows, n)` inputs in `dtype`:
/// the output and both input gradients of `sum(op(a, b) * r)`, as the largest relative
/// difference, and the time of a forward and backward of each.
#[allow(clippy::too_many_arguments)]
fn op_check(
    name: &str,
    (rows, n): (usize, usize),
    dtype: DType,
    dev: &Device,
    steps: usize,
    b_is_weight: bool,
    fused: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    composed: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> anyhow::Result<KernelCheck> {
    // (1, rows, n): a batch of one sequence, as the decoder's passes have it.
    let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, rows, n), dev)?.to_dtype(dtype)?)?;
    let b_shape: &[usize] = if b_is_weight { &[n] } else { &[1, rows, n] };
    let b =
        Tensor::randn(0f32, 0.5, b_shape, dev)?.affine(1.0, if b_is_weight { 1.0 } else { 0.0 })?;
    let b = Var::from_tensor(&b.to_dtype(dtype)?)?;
    let r = Tensor::randn(0f32, 1.0, (1, rows, n), dev)?.to_dtype(dtype)?;
    let run = |f: &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
        let y = f(a.as_tensor(), b.as_tensor())?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let ga = grads.get(a.as_tensor()).cloned();
        let gb = grads.get(b.as_tensor()).cloned();
        candle_core::Result::Ok((y, ga, gb))
    };
    let (mut kernel_ms, mut reference_ms) = (vec![], vec![]);
    for _ in 0..steps {
        for (f, times) in [
            (
                &fused as &dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
                &mut kernel_ms,
            ),
            (&composed, &mut reference_ms),
        ] {
            dev.synchronize()?;
            let t = Instant::now();
            run(f)?;
            dev.synchronize()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (y1, ga1, gb1) = run(&fused)?;
    let (y2, ga2, gb2) = run(&composed)?;
    let mut max_diff = rel_diff(&y1, &y2)?;
    for (g1, g2) in [(ga1, ga2), (gb1, gb2)] {
        match (g1, g2) {
            (Some(g1), Some(g2)) => max_diff = max_diff.max(rel_diff(&g1, &g2)?),
            _ => max_diff = f64::NAN,
        }
    }
    Ok(KernelCheck {
        kernel: format!("{name} ({rows}x{n}, {dtype:?}, relative)"),
        path: if dev.is_cpu() { "cpu" } else { "cuda" },
        max_diff,
        // f32: rounding; bf16: a few units in the last place of 8 bits.
        tolerance: if dtype == DType::BF16 { 2e-2 } else { 1e-4 },
        kernel_ms: crate::numeric::median(&kernel_ms),
        reference_ms: crate::numeric::median(&reference_ms),
    })
}

/// A one-input differentiable op (f32), fused against composed, on `x` of `shape`: the output
/// and the gradient of `sum(op(x) * r)`, and the time of a forward and backward of each.
fn op_check1(
    name: &str,
    x: Tensor,
    steps: usize,
    fused: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
    composed: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> anyhow::Result<KernelCheck> {
    let dev = x.device().clone();
    let shape = x.dims().to_vec();
    let x = Var::from_tensor(&x)?;
    let r = x.as_tensor().randn_like(0.0, 1.0)?;
    let run = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
        let y = f(x.as_tensor())?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        candle_core::Result::Ok((y, grads.get(x.as_tensor()).cloned()))
    };
    let time = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| -> anyhow::Result<f64> {
        dev.synchronize()?;
        let t = Instant::now();
        run(f)?;
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut kernel_ms, mut reference_ms) = (vec![], vec![]);
    for _ in 0..steps {
        kernel_ms.push(time(&fused)?);
        reference_ms.push(time(&composed)?);
    }
    let ((y1, g1), (y2, g2)) = (run(&fused)?, run(&composed)?);
    let max_diff = match (g1, g2) {
        (Some(g1), Some(g2)) => rel_diff(&y1, &y2)?.max(rel_diff(&g1, &g2)?),
        _ => f64::NAN,
    };
    Ok(KernelCheck {
        kernel: format!("{name} ({shape:?}, F32, relative)"),
        path: if dev.is_cpu() { "cpu" } else { "cuda" },
        max_diff,
        tolerance: 1e-4,
        kernel_ms: crate::numeric::median(&kernel_ms),
        reference_ms: crate::numeric::median(&reference_ms),
    })
}

/// The fused RMS norm (f32, as training takes norms) and SwiGLU (f32, and bf16 off the CPU)
/// over `rows` positions of `dec`'s widths.
pub fn block_ops(dec: &Decoder, rows: usize, steps: usize) -> anyhow::Result<Vec<KernelCheck>> {
    use crate::model::fused;
    let dev = dec.device();
    let cfg = dec.config();
    let eps = cfg.rms_norm_eps;
    let mut out = vec![op_check(
        "rms norm fwd+bwd",
        (rows, cfg.hidden_size),
        DType::F32,
        dev,
        steps,
        true,
        |x, w| fused::rms_norm(x, w, eps),
        |x, w| candle_nn::ops::rms_norm_slow(x, w, eps as f32),
    )?];
    let dtypes: &[DType] = if dev.is_cpu() {
        &[DType::F32]
    } else {
        &[DType::F32, DType::BF16]
    };
    for &dtype in dtypes {
        out.push(op_check(
            "swiglu fwd+bwd",
            (rows, cfg.intermediate_size),
            dtype,
            dev,
            steps,
            false,
            fused::swiglu,
            |a, b| candle_nn::ops::silu(a)? * b,
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
    out.push(op_check1(
        "rope fwd+bwd",
        Tensor::randn(0f32, 1.0, (1, heads, rows, d), dev)?,
        steps,
        |x| fused::rope(x, &cos, &sin),
        |x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin),
    )?);
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
    let scores = Tensor::randn(0f32, 3.0, (1, heads, rows, rows), dev)?.broadcast_add(&mask)?;
    out.push(op_check1(
        "causal softmax fwd+bwd",
        scores,
        steps,
        fused::softmax_last_dim,
        |x| candle_nn::ops::softmax(x, candle_core::D::Minus1),
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
    let composed = || -> candle_core::Result<Tensor> {
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
        Tensor::cat(&rows, 0)
    };
    let kernel = || crate::model::decode_attention::attend_rows(&q, &kv, scale);
    let applies = crate::model::decode_attention::applies(&q, &kv);
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> candle_core::Result<f64> {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut kernel_ms, mut reference_ms) = (vec![], vec![]);
    for _ in 0..steps {
        if applies {
            kernel_ms.push(time(&kernel)?);
        }
        reference_ms.push(time(&composed)?);
    }
    let max_diff = if applies {
        rel_diff(&kernel()?, &composed()?)?
    } else {
        f64::NAN
    };
    Ok(KernelCheck {
        kernel: format!("decode attention ({rows} rows, ~{len} positions, {dtype:?}, relative)"),
        path: match (applies, dev.is_cpu()) {
            (false, _) => "candle",
            (true, true) => "cpu",
            (true, false) => "cuda",
        },
        max_diff,
        tolerance: if dtype == DType::BF16 { 2e-2 } else { 1e-4 },
        kernel_ms: if applies {
            crate::numeric::median(&kernel_ms)
        } else {
            f64::NAN
        },
        reference_ms: crate::numeric::median(&reference_ms),
    })
}

/// The LoRA-add kernel against the composed delta: `rows` decode rows of the hidden width,
/// one adapter shared (`rows` = 1) or one per row (gathered), rank 8, in `dtype`.
#[cfg(feature = "cuda")]
pub fn lora_add(
    dec: &Decoder,
    rows: usize,
    dtype: DType,
    steps: usize,
) -> anyhow::Result<KernelCheck> {
    use crate::model::{Adapter, Gathered, PerRow, RowFactors, Target};
    let dev = dec.device();
    let h = dec.config().hidden_size;
    let cfg = LoraConfig::default();
    let loras = (0..rows)
        .map(|i| Lora::new(dec.config(), &cfg, i as u64 + 1, dev, dtype))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // A fresh LoRA's B is zero: give each a random one, as a trained adapter has.
    for l in &loras {
        for v in l.vars() {
            if v.dims()[1] == cfg.rank {
                v.set(&Tensor::randn(0f32, 0.05, v.dims(), dev)?.to_dtype(dtype)?)?;
            }
        }
    }
    let adapters: Vec<Option<&dyn Adapter>> =
        loras.iter().map(|l| Some(l as &dyn Adapter)).collect();
    let cache = Gathered::default();
    let per_row = PerRow::with_cache(adapters, &cache);
    let adapter: &dyn Adapter = if rows == 1 { &loras[0] } else { &per_row };
    let x = Tensor::randn(0f32, 1.0, (rows, 1, h), dev)?.to_dtype(dtype)?;
    // The projection's output: zeros, so the output is the delta itself, rounded once.
    let y = Tensor::zeros((rows, 1, h), dtype, dev)?;
    let kernel = || -> candle_core::Result<Tensor> {
        let added = match adapter.row_factors(0, Target::Q, &x)? {
            Some(RowFactors::Shared { a, b, scale }) => {
                crate::model::cuda::lora::add(&y, &x, &a, &b, None, scale)?
            }
            Some(RowFactors::Stacked { a, b, scales }) => {
                crate::model::cuda::lora::add(&y, &x, &a, &b, Some(&scales), 0.0)?
            }
            None => None,
        };
        added.ok_or_else(|| candle_core::Error::Msg("the kernel did not take the factors".into()))
    };
    let composed = || -> candle_core::Result<Tensor> {
        let d = adapter.delta(0, Target::Q, &x)?.expect("a delta on q");
        &y + d
    };
    let time = |f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<f64> {
        dev.synchronize()?;
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let (mut kernel_ms, mut reference_ms) = (vec![], vec![]);
    for _ in 0..steps {
        kernel_ms.push(time(&kernel)?);
        reference_ms.push(time(&composed)?);
    }
    let max_diff = rel_diff(&kernel()?, &composed()?)?;
    Ok(KernelCheck {
        kernel: format!("lora add ({rows} rows, rank 8, {dtype:?}, relative)"),
        path: "cuda",
        max_diff,
        tolerance: if dtype == DType::BF16 { 2e-2 } else { 1e-4 },
        kernel_ms: crate::numeric::median(&kernel_ms),
        reference_ms: crate::numeric::median(&reference_ms),
    })
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
        for rows in [1, 8] {
            out.push(decode_attention(dec, rows, 1000, dtype, steps)?);
            #[cfg(feature = "cuda")]
            if dev.is_cuda() {
                out.push(lora_add(dec, rows, dtype, steps)?);
            }
        }
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
        let parts =
            crate::model::tiny::tiny_parts(crate::model::Arch::Llama, 3, &Device::Cpu, DType::F32)
                .unwrap();
        let dec = crate::model::Model::from_parts("t", parts).unwrap().decoder;
        let checks = block_ops(&dec, 24, 2).unwrap();
        assert_eq!(checks.len(), 4);
        for c in &checks {
            assert!(c.ok(), "{c:?}");
            assert_eq!(c.path, "cpu");
        }
    }

    #[test]
    fn decode_attention_matches_the_composed_ops_over_cache_views() {
        let parts =
            crate::model::tiny::tiny_parts(crate::model::Arch::Qwen2, 3, &Device::Cpu, DType::F32)
                .unwrap();
        let dec = crate::model::Model::from_parts("t", parts).unwrap().decoder;
        for rows in [1, 3] {
            let c = decode_attention(&dec, rows, 40, DType::F32, 2).unwrap();
            assert_eq!(c.path, "cpu");
            assert!(c.ok(), "{c:?}");
        }
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
