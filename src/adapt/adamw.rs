//! AdamW that updates weights in place. candle_nn::AdamW builds several new tensors per
//! variable per step, which for full-weight adaptation (every weight of the model) costs more
//! than the forward and backward passes together; here each element is read and written once.
//! On the CPU in f32 that is the loop below; on a CUDA device (f32 or bf16) the multi-tensor
//! kernels of `model::cuda::optimizer`, which also clip on the device; elsewhere
//! candle_nn::AdamW.

use std::sync::Mutex;

use candle_core::{CpuStorage, InplaceOp2, Layout, Result, Tensor, Var};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rayon::prelude::*;

use super::norms::global_norm;
#[cfg(feature = "cuda")]
use crate::model::cuda::optimizer::{AdamWStep, GradScale, MultiTensorAdamW};

/// One in-place update of a weight given its gradient; holds the moment estimates.
struct Moments {
    m: Mutex<Vec<f32>>,
    v: Mutex<Vec<f32>>,
}

struct Update<'a> {
    moments: &'a Moments,
    p: &'a ParamsAdamW,
    /// Bias corrections 1 - beta^t.
    c1: f64,
    c2: f64,
    /// Gradient multiplier (global-norm clipping).
    scale: f32,
}

impl InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-inplace"
    }

    fn cpu_fwd(&self, w: &mut CpuStorage, lw: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        let (CpuStorage::F32(w), CpuStorage::F32(g)) = (w, g) else {
            candle_core::bail!("adamw-inplace: f32 only");
        };
        if !lw.is_contiguous() || !lg.is_contiguous() {
            candle_core::bail!("adamw-inplace: contiguous tensors only");
        }
        let n = lw.shape().elem_count();
        let w = &mut w[lw.start_offset()..lw.start_offset() + n];
        let g = &g[lg.start_offset()..lg.start_offset() + n];
        let mut m = self.moments.m.lock().unwrap_or_else(|e| e.into_inner());
        let mut v = self.moments.v.lock().unwrap_or_else(|e| e.into_inner());
        let (b1, b2) = (self.p.beta1 as f32, self.p.beta2 as f32);
        let lr = self.p.lr as f32;
        let decay = 1.0 - lr * self.p.weight_decay as f32;
        let (c1, c2) = (self.c1 as f32, self.c2 as f32);
        let (eps, scale) = (self.p.eps as f32, self.scale);
        const CHUNK: usize = 1 << 14;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| {
                // Zipped iterators (no bounds checks) so the loop vectorises.
                let (inv_c1, inv_c2) = (1.0 / c1, 1.0 / c2);
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let g = g * scale;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let update = (*m * inv_c1) / ((*v * inv_c2).sqrt() + eps);
                    *w = *w * decay - lr * update;
                }
            });
        Ok(())
    }
}

enum Inner {
    InPlace {
        vars: Vec<(Var, Moments)>,
        step: i32,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        kernels: MultiTensorAdamW,
        vars: Vec<Var>,
        step: i32,
    },
    Candle(AdamW, Vec<Var>),
}

/// One variable's first and second moment estimates.
pub type MomentPair = (Vec<f32>, Vec<f32>);

/// AdamW (decoupled weight decay, bias-corrected moments) over `vars`.
pub struct FastAdamW {
    inner: Inner,
    params: ParamsAdamW,
}

impl FastAdamW {
    pub fn new(vars: Vec<Var>, params: ParamsAdamW) -> Result<Self> {
        let in_place = vars.iter().all(|v| {
            v.device().is_cpu() && v.dtype() == candle_core::DType::F32 && v.is_contiguous()
        });
        #[cfg(feature = "cuda")]
        {
            let tensors: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
            if MultiTensorAdamW::applies(&tensors) {
                let kernels = MultiTensorAdamW::new(&tensors)?;
                let inner = Inner::Cuda {
                    kernels,
                    vars,
                    step: 0,
                };
                return Ok(Self { inner, params });
            }
        }
        let inner = if in_place {
            let vars = vars
                .into_iter()
                .map(|v| {
                    let n = v.elem_count();
                    let m = Moments {
                        m: Mutex::new(vec![0.0; n]),
                        v: Mutex::new(vec![0.0; n]),
                    };
                    (v, m)
                })
                .collect();
            Inner::InPlace { vars, step: 0 }
        } else {
            Inner::Candle(AdamW::new(vars.clone(), params.clone())?, vars)
        };
        Ok(Self { inner, params })
    }

    /// Which implementation steps: `cpu` (the in-place loop), `cuda` (the multi-tensor
    /// kernels) or `candle` (candle_nn::AdamW).
    pub fn path(&self) -> &'static str {
        match self.inner {
            Inner::InPlace { .. } => "cpu",
            #[cfg(feature = "cuda")]
            Inner::Cuda { .. } => "cuda",
            Inner::Candle(..) => "candle",
        }
    }

    /// The step count and each variable's first and second moments, for a checkpoint; `None`
    /// on the candle fallback, whose state is not reachable.
    pub fn state(&self) -> Option<(i32, Vec<MomentPair>)> {
        match &self.inner {
            Inner::InPlace { vars, step } => Some((
                *step,
                vars.iter()
                    .map(|(_, m)| {
                        let get = |x: &Mutex<Vec<f32>>| {
                            x.lock().unwrap_or_else(|e| e.into_inner()).clone()
                        };
                        (get(&m.m), get(&m.v))
                    })
                    .collect(),
            )),
            #[cfg(feature = "cuda")]
            Inner::Cuda { kernels, step, .. } => kernels.moments().ok().map(|m| (*step, m)),
            Inner::Candle(..) => None,
        }
    }

    /// Restores what [`FastAdamW::state`] returned, for the same variables.
    pub fn restore(&mut self, at: i32, moments: Vec<MomentPair>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Inner::Cuda { kernels, step, .. } = &mut self.inner {
            kernels.set_moments(&moments)?;
            *step = at;
            return Ok(());
        }
        let Inner::InPlace { vars, step } = &mut self.inner else {
            candle_core::bail!(
                "optimiser state can be restored only for f32 variables on the CPU or CUDA"
            );
        };
        if moments.len() != vars.len() {
            candle_core::bail!(
                "optimiser state for {} variables, not {}",
                moments.len(),
                vars.len()
            );
        }
        for ((var, m), (first, second)) in vars.iter().zip(moments) {
            if first.len() != var.elem_count() || second.len() != var.elem_count() {
                candle_core::bail!(
                    "optimiser state does not fit a variable of {} elements",
                    var.elem_count()
                );
            }
            *m.m.lock().unwrap_or_else(|e| e.into_inner()) = first;
            *m.v.lock().unwrap_or_else(|e| e.into_inner()) = second;
        }
        *step = at;
        Ok(())
    }

    /// One step with `grads[i]` for the i-th variable, scaled down together so that their
    /// global L2 norm is at most `clip_norm` (no clipping when it is 0 or less).
    pub fn step_clipped(&mut self, grads: &[Tensor], clip_norm: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Inner::Cuda {
            kernels,
            vars,
            step,
        } = &mut self.inner
        {
            let scale = GradScale::ClipNorm(clip_norm);
            return cuda_step(kernels, vars, step, &self.params, grads, scale);
        }
        let norm = global_norm(grads)?;
        let scale = if clip_norm > 0.0 && norm > clip_norm {
            clip_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.step(grads, scale)
    }

    /// One step with `grads[i]` for the i-th variable, each multiplied by `scale`.
    pub fn step(&mut self, grads: &[Tensor], scale: f64) -> Result<()> {
        match &mut self.inner {
            #[cfg(feature = "cuda")]
            Inner::Cuda {
                kernels,
                vars,
                step,
            } => cuda_step(
                kernels,
                vars,
                step,
                &self.params,
                grads,
                GradScale::By(scale),
            ),
            Inner::InPlace { vars, step } => {
                *step += 1;
                let c1 = 1.0 - self.params.beta1.powi(*step);
                let c2 = 1.0 - self.params.beta2.powi(*step);
                for ((var, moments), g) in vars.iter().zip(grads) {
                    let update = Update {
                        moments,
                        p: &self.params,
                        c1,
                        c2,
                        scale: scale as f32,
                    };
                    var.as_tensor().inplace_op2(&g.contiguous()?, &update)?;
                }
                Ok(())
            }
            Inner::Candle(opt, vars) => {
                let mut store = candle_core::backprop::GradStore::default();
                for (v, g) in vars.iter().zip(grads) {
                    store.insert(v.as_tensor(), (g * scale)?);
                }
                opt.step(&store)
            }
        }
    }
}

/// One step of the CUDA kernels; `step` counts it.
#[cfg(feature = "cuda")]
fn cuda_step(
    kernels: &MultiTensorAdamW,
    vars: &[Var],
    step: &mut i32,
    p: &ParamsAdamW,
    grads: &[Tensor],
    scale: GradScale,
) -> Result<()> {
    *step += 1;
    let hyper = AdamWStep {
        lr: p.lr,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: p.eps,
        weight_decay: p.weight_decay,
        c1: 1.0 - p.beta1.powi(*step),
        c2: 1.0 - p.beta2.powi(*step),
    };
    let tensors: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
    kernels.step(&tensors, grads, &hyper, scale)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn matches_candle_adamw_step_for_step() -> Result<()> {
        let dev = Device::Cpu;
        let p = ParamsAdamW {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let init = Tensor::randn(0f32, 1.0, (40_000,), &dev)?;
        let (a, b) = (Var::from_tensor(&init)?, Var::from_tensor(&init)?);
        let mut fast = FastAdamW::new(vec![a.clone()], p.clone())?;
        assert!(matches!(fast.inner, Inner::InPlace { .. }));
        let mut reference = AdamW::new(vec![b.clone()], p)?;
        for step in 0..4 {
            let g = Tensor::randn(0f32, 1.0, (40_000,), &dev)?;
            let scale = if step == 2 { 0.5 } else { 1.0 };
            fast.step(std::slice::from_ref(&g), scale)?;
            let mut store = candle_core::backprop::GradStore::default();
            store.insert(b.as_tensor(), (g * scale)?);
            reference.step(&store)?;
            let d = (a.as_tensor() - b.as_tensor())?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-5, "step {step}: max diff {d}");
        }
        let moved = (a.as_tensor() - &init)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(moved > 0.01);
        // f64 variables take the fallback and still train.
        let c = Var::from_tensor(&init.to_dtype(DType::F64)?)?;
        let mut slow = FastAdamW::new(vec![c.clone()], ParamsAdamW::default())?;
        assert!(matches!(slow.inner, Inner::Candle(..)));
        slow.step(&[c.as_tensor().ones_like()?], 1.0)?;
        let moved = (c.as_tensor().to_dtype(DType::F32)? - &init)?
            .abs()?
            .max_all()?;
        assert!(moved.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
