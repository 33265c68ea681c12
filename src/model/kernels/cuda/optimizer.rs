//! AdamW over every trained tensor of a CUDA model in three launches per step (`optimizer.cu`):
//! partial sums of squares, their fixed-order total and clipping factor, then the update of
//! every weight. The clipping factor never leaves the device, so a step has no host round
//! trip; the moments live in two flat f32 buffers whatever the weights' dtype.

use candle_core::{CudaDevice, DType, Device, Result, Tensor};

use super::abi::{self, Addr};
use super::{cuda_device, function, with_addresses};

/// Elements per block and threads per block, as in `optimizer.cu`.
use abi::grid::OPTIMIZER_CHUNK as CHUNK;

/// One step's hyper-parameters; `c1`, `c2` are the bias corrections `1 - beta^t`.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub c1: f64,
    pub c2: f64,
}

/// How the gradients are scaled before the update.
#[derive(Clone, Copy, Debug)]
pub enum GradScale {
    /// By this factor.
    By(f64),
    /// To a global L2 norm of at most this (no clipping when it is 0 or less), on the device.
    ClipNorm(f64),
}

/// The moments and layout of one set of trained tensors.
pub struct MultiTensorAdamW {
    dev: CudaDevice,
    dtype: DType,
    /// Per tensor: moment offset, length, first block, 0 (`(n, 4)` i64 on the device).
    meta: Tensor,
    /// Each tensor's moment offset and length.
    spans: Vec<(usize, usize)>,
    blocks: usize,
    m: Tensor,
    v: Tensor,
    /// One partial sum of squares per block, and the norm and clipping factor (f64).
    partial: Tensor,
    norm: Tensor,
}

impl MultiTensorAdamW {
    /// Whether the kernels take `vars`: contiguous f32 or bf16 tensors of one dtype on one
    /// CUDA device.
    pub fn applies(vars: &[&Tensor]) -> bool {
        let Some(first) = vars.first() else {
            return false;
        };
        super::enabled()
            && first.device().is_cuda()
            && matches!(first.dtype(), DType::F32 | DType::BF16)
            && vars.iter().all(|v| {
                v.dtype() == first.dtype()
                    && v.is_contiguous()
                    && v.device().same_device(first.device())
            })
    }

    pub fn new(vars: &[&Tensor]) -> Result<Self> {
        if !Self::applies(vars) {
            candle_core::bail!(
                "multi-tensor AdamW: contiguous f32 or bf16 CUDA tensors of one dtype"
            );
        }
        let dev = cuda_device(vars[0], "multi-tensor AdamW")?.clone();
        let device = Device::Cuda(dev.clone());
        let (mut offset, mut block) = (0usize, 0usize);
        let mut meta = Vec::with_capacity(vars.len() * 4);
        let mut spans = Vec::with_capacity(vars.len());
        for v in vars {
            let n = v.elem_count();
            meta.extend([offset as i64, n as i64, block as i64, 0]);
            spans.push((offset, n));
            offset += n;
            block += n.div_ceil(CHUNK);
        }
        let zeros = |n: usize, dtype| Tensor::zeros(n.max(1), dtype, &device);
        Ok(Self {
            dtype: vars[0].dtype(),
            meta: Tensor::from_vec(meta, (vars.len(), 4), &device)?,
            spans,
            blocks: block,
            m: zeros(offset, DType::F32)?,
            v: zeros(offset, DType::F32)?,
            partial: zeros(block, DType::F64)?,
            norm: zeros(2, DType::F64)?,
            dev,
        })
    }

    /// Updates `vars` (those given to [`MultiTensorAdamW::new`], in order) in place with
    /// `grads`, scaled as `scale` says.
    pub fn step(
        &self,
        vars: &[&Tensor],
        grads: &[Tensor],
        p: &AdamWStep,
        scale: GradScale,
    ) -> Result<()> {
        if vars.len() != self.spans.len() || grads.len() != vars.len() {
            candle_core::bail!(
                "multi-tensor AdamW: {} variables and {} gradients for {} tensors",
                vars.len(),
                grads.len(),
                self.spans.len()
            );
        }
        let grads = grads
            .iter()
            .zip(&self.spans)
            .map(|(g, &(_, n))| {
                if g.elem_count() != n {
                    candle_core::bail!(
                        "multi-tensor AdamW: a gradient of {} elements for {n}",
                        g.elem_count()
                    );
                }
                g.to_dtype(self.dtype)?.contiguous()
            })
            .collect::<Result<Vec<_>>>()?;
        if self.blocks == 0 {
            return Ok(());
        }
        let stream = self.dev.cuda_stream();
        let pairs: Vec<&Tensor> = vars.iter().zip(&grads).flat_map(|(v, g)| [*v, g]).collect();
        with_addresses(&stream, &pairs, |addresses| {
            let device = Device::Cuda(self.dev.clone());
            let table = Tensor::from_vec(addresses.to_vec(), addresses.len(), &device)?;
            let fixed = [
                &table,
                &self.meta,
                &self.m,
                &self.v,
                &self.partial,
                &self.norm,
            ];
            with_addresses(&stream, &fixed, |a| self.launch(a, p, scale))
        })
    }

    /// The three launches; `a` holds the addresses of the pointer table, meta, m, v, partial
    /// and norm.
    fn launch(&self, a: &[i64], p: &AdamWStep, scale: GradScale) -> Result<()> {
        let [table, meta, mut m, mut v, mut partial, mut norm] =
            [a[0], a[1], a[2], a[3], a[4], a[5]].map(|p| Addr(p as u64));
        let n = self.spans.len() as i32;
        let grid = |blocks: usize| abi::grid::optimizer(blocks).into();
        let func = |decl: &abi::Decl| function(&self.dev, decl, self.dtype);
        let (scale_at, host_scale) = match scale {
            GradScale::By(k) => (Addr::NULL, k as f32),
            GradScale::ClipNorm(clip) => {
                {
                    let f = func(&abi::sum_squares::DECL)?;
                    let mut b = f.builder();
                    abi::sum_squares::push(&mut b, &table, &meta, &n, &mut partial);
                    // SAFETY: the arguments are the declared ones, every address is that of a
                    // live, contiguous buffer of the dtype the kernel reads
                    // (`with_addresses`), and the grid covers exactly the blocks `meta`
                    // describes.
                    unsafe { b.launch(grid(self.blocks)) }.map_err(candle_core::Error::wrap)?;
                }
                let f = func(&abi::norm_scale::DECL)?;
                let mut b = f.builder();
                let blocks = self.blocks as i64;
                abi::norm_scale::push(&mut b, &partial, &blocks, &clip, &mut norm);
                // SAFETY: as above; one block reads `blocks` partial sums and writes two f64.
                unsafe { b.launch(grid(1)) }.map_err(candle_core::Error::wrap)?;
                drop(b);
                (norm, 1.0f32)
            }
        };
        let f = func(&abi::adamw::DECL)?;
        let mut b = f.builder();
        let lr = p.lr as f32;
        let (b1, b2, eps) = (p.beta1 as f32, p.beta2 as f32, p.eps as f32);
        let decay = 1.0 - lr * p.weight_decay as f32;
        let (inv_c1, inv_c2) = (1.0 / p.c1 as f32, 1.0 / p.c2 as f32);
        abi::adamw::push(
            &mut b,
            &table,
            &meta,
            &n,
            &mut m,
            &mut v,
            &scale_at,
            &host_scale,
            &lr,
            &b1,
            &b2,
            &eps,
            &decay,
            &inv_c1,
            &inv_c2,
        );
        // SAFETY: as above; each block updates its own CHUNK of one tensor and of its moments.
        unsafe { b.launch(grid(self.blocks)) }.map_err(candle_core::Error::wrap)?;
        Ok(())
    }

    /// The last step's global gradient norm (after a [`GradScale::ClipNorm`] step).
    pub fn last_norm(&self) -> Result<f64> {
        self.norm.get(0)?.to_scalar::<f64>()
    }

    /// Each tensor's first and second moments, copied to the host.
    pub fn moments(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let (m, v) = (self.m.to_vec1::<f32>()?, self.v.to_vec1::<f32>()?);
        Ok(self
            .spans
            .iter()
            .map(|&(o, n)| (m[o..o + n].to_vec(), v[o..o + n].to_vec()))
            .collect())
    }

    /// Replaces the moments with `moments` (as [`MultiTensorAdamW::moments`] returned them).
    pub fn set_moments(&mut self, moments: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
        if moments.len() != self.spans.len()
            || moments
                .iter()
                .zip(&self.spans)
                .any(|((m, v), &(_, n))| m.len() != n || v.len() != n)
        {
            candle_core::bail!("optimiser state does not fit these variables");
        }
        let device = Device::Cuda(self.dev.clone());
        let flat = |second: bool| {
            let mut all: Vec<f32> = moments
                .iter()
                .flat_map(|(m, v)| if second { v } else { m }.iter().copied())
                .collect();
            if all.is_empty() {
                all.push(0.0);
            }
            let n = all.len();
            Tensor::from_vec(all, n, &device)
        };
        self.m = flat(false)?;
        self.v = flat(true)?;
        Ok(())
    }
}
