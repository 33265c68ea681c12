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
    Ok(out)
}

/// Prints the checks as a table; fails when one is outside its tolerance.
pub fn run(dec: &Decoder, steps: usize) -> anyhow::Result<()> {
    let checks = all(dec, steps)?;
    println!(
        "{:<36} {:<7} {:>10} {:>9} {:>10} {:>12}  parity",
        "kernel", "path", "max diff", "tol", "kernel ms", "candle ms"
    );
    for c in &checks {
        println!(
            "{:<36} {:<7} {:>10.2e} {:>9.0e} {:>10.3} {:>12.3}  {}",
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
