//! Decode products on q8_0 weights, ours on the CPU: `x W^T` for the few rows of a decode step
//! (one per running sequence), the weights as 32-value blocks of int8 with one f32 scale.
//!
//! Why not candle's q8_0 `QMatMul`: it walks the whole weight once per input row, so a batched
//! decode step of `r` sequences costs `r` lone steps. Here each weight block is loaded once and
//! dotted with every row while it is in registers (the rows are tiled, the weights streamed
//! once per step), split over threads by output column.
//!
//! Every output element is one fixed computation whatever the batch, the tiling or the thread
//! count: the row's activations quantized alone, integer block dots (exact), eight f32 lane
//! sums fused-multiply-added block after block in order, and one fixed final sum of the eight
//! lanes. So a row's result is the same bits alone or batched, on any thread count, and the
//! portable kernel reproduces the AVX2 one bit for bit (the tests hold both to that).

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86_avx2;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Values per block.
pub const BLOCK: usize = 32;

/// A `(n, k)` weight as q8_0 blocks: row `j`'s block `b` is `qs[(j * kb + b) * 32..][..32]`
/// scaled by `d[j * kb + b]`.
pub struct Q8Weight {
    n: usize,
    k: usize,
    d: Vec<f32>,
    qs: Vec<i8>,
}

/// Quantizes `x` (a multiple of 32 values) into `d` (one scale per block) and `qs`: the scale
/// is the block's largest magnitude over 127, values round to nearest (as ggml's q8_0).
fn quantize_into(x: &[f32], d: &mut [f32], qs: &mut [i8]) {
    for ((xb, db), qb) in x
        .chunks_exact(BLOCK)
        .zip(d.iter_mut())
        .zip(qs.chunks_exact_mut(BLOCK))
    {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        *db = scale;
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

impl Q8Weight {
    /// From an `(n, k)` f32-convertible weight; `k` must be a multiple of 32.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if k % BLOCK != 0 {
            candle_core::bail!("q8: {k} input features are not a multiple of {BLOCK}");
        }
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let kb = k / BLOCK;
        let mut d = vec![0f32; n * kb];
        let mut qs = vec![0i8; n * k];
        quantize_into(&data, &mut d, &mut qs);
        Ok(Self { n, k, d, qs })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// `x W^T` for `m` rows of `x` (`m * k` values): `(m, n)` row-major. `kernel` says which
    /// implementation runs; [`Kernel::best`] is the fastest this CPU has.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let kb = k / BLOCK;
        let mut xd = vec![0f32; m * kb];
        let mut xq = vec![0i8; m * k];
        quantize_into(&x[..m * k], &mut xd, &mut xq);
        let acts = Acts { m, d: &xd, qs: &xq };
        // Column-major tiles (each task's columns for every row, contiguous), then transposed:
        // tasks write disjoint slices without unsafe sharing. Enough columns per task that
        // the per-task cost is small against its work.
        let cols = (COLS_PER_TASK / m.max(1)).clamp(8, COLS_PER_TASK);
        let mut colmajor = vec![0f32; n * m];
        colmajor
            .par_chunks_mut(cols * m)
            .enumerate()
            .for_each(|(t, out)| {
                let j0 = t * cols;
                let j1 = (j0 + cols).min(n);
                for j in j0..j1 {
                    let w = WeightRow {
                        d: &self.d[j * kb..(j + 1) * kb],
                        qs: &self.qs[j * k..(j + 1) * k],
                    };
                    kernel.dot_rows(&w, &acts, &mut out[(j - j0) * m..(j - j0 + 1) * m]);
                }
            });
        if m == 1 {
            return colmajor;
        }
        let mut y = vec![0f32; m * n];
        for (j, col) in colmajor.chunks_exact(m).enumerate() {
            for (r, v) in col.iter().enumerate() {
                y[r * n + j] = *v;
            }
        }
        y
    }
}

/// Output columns per parallel task for one row (fewer per task as rows grow).
const COLS_PER_TASK: usize = 64;

/// One weight row's blocks.
pub struct WeightRow<'a> {
    pub d: &'a [f32],
    pub qs: &'a [i8],
}

/// The quantized input rows.
pub struct Acts<'a> {
    pub m: usize,
    pub d: &'a [f32],
    pub qs: &'a [i8],
}

/// Which implementation computes the block dots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust: every CPU. The reference the SIMD kernels are held to.
    Portable,
    /// AVX2 + FMA (x86-64).
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// `out[r] = x_r · w` for every row `r` of `acts`.
    fn dot_rows(self, w: &WeightRow, acts: &Acts, out: &mut [f32]) {
        match self {
            Self::Portable => portable::dot_rows(w, acts, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `best` picks Avx2 only where the CPU has AVX2 and FMA; tests pick it
            // only after the same check.
            Self::Avx2 => unsafe { x86_avx2::dot_rows(w, acts, out) },
            #[cfg(not(target_arch = "x86_64"))]
            Self::Avx2 => portable::dot_rows(w, acts, out),
        }
    }
}

/// The sum of a block accumulator's eight lanes, in the order both kernels use.
#[inline]
pub fn sum_lanes(l: [f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// A decode-time product: ours on q8_0 CPU weights, candle's quantized matmul otherwise
/// (other formats, other devices).
pub enum DecodeMatmul {
    Q8(Arc<Q8Weight>),
    Candle(QMatMul),
}

struct Q8Op {
    w: Arc<Q8Weight>,
    kernel: Kernel,
}

impl CustomOp1 for Q8Op {
    fn name(&self) -> &'static str {
        "q8-decode-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = x else {
            candle_core::bail!("q8-decode-matmul: input must be f32");
        };
        if !l.is_contiguous() {
            candle_core::bail!("q8-decode-matmul: input must be contiguous");
        }
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.w.k {
            candle_core::bail!(
                "q8-decode-matmul: input has {k} features, weight expects {}",
                self.w.k
            );
        }
        let m = l.shape().elem_count() / k.max(1);
        let x = &data[l.start_offset()..l.start_offset() + m * k];
        let y = self.w.matmul(x, m, self.kernel);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = self.w.n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }
}

impl DecodeMatmul {
    /// A decode copy of `w` (`(out, in)`) in `dtype`.
    pub fn new(w: &Tensor, dtype: GgmlDType) -> Result<Self> {
        let ours =
            dtype == GgmlDType::Q8_0 && matches!(w.device(), Device::Cpu) && w.dim(1)? % BLOCK == 0;
        Ok(match ours {
            true => Self::Q8(Arc::new(Q8Weight::quantize(w)?)),
            false => Self::Candle(QMatMul::from_qtensor(QTensor::quantize(w, dtype)?)?),
        })
    }

    /// `x W^T` for an f32 `x` (`(..., in)`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Q8(w) => x.contiguous()?.apply_op1_no_bwd(&Q8Op {
                w: w.clone(),
                kernel: Kernel::best(),
            }),
            Self::Candle(q) => candle_core::Module::forward(q, x),
        }
    }
}

#[cfg(test)]
mod tests;
