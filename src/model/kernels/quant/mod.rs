//! Decode products on block-quantized weights, ours on the CPU: `x W^T` for the few rows of a
//! decode step (one per running sequence). Two weight formats, both 32-value blocks:
//! - **q8_0**: int8 values and one f32 scale per block;
//! - **q4_1**: 4-bit values `q` in 0..15 with an f16 scale `d` and minimum `m` (`w = d q + m`),
//!   ggml's layout, so a GGUF's q4_1 weights are held exactly as stored and decode reads as
//!   few bytes per token as llama.cpp does (0.625 bytes a weight against q8_0's 1.125).
//!
//! Why not candle's `QMatMul`: it walks the whole weight once per input row, so a batched
//! decode step of `r` sequences costs `r` lone steps. Here each weight block is loaded once and
//! dotted with every row while it is in registers (the rows are tiled, the weights streamed
//! once per step), split over threads by output column.
//!
//! Every output element is one fixed computation whatever the batch, the tiling or the thread
//! count: the row's activations quantized alone (q8_0), integer block dots (exact), eight f32
//! lane sums fused-multiply-added block after block in order (q4_1 adds its minimum's term
//! to a ninth sum), and one fixed final sum of the lanes. So a row's result is the same bits
//! alone or batched, on any thread count, and the portable kernels reproduce the AVX2 ones bit
//! for bit (the tests hold both to that).

#[cfg(target_arch = "x86_64")]
mod cpu_avx2;
mod portable;

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use half::f16;
use rayon::prelude::*;

/// Values per block.
pub const BLOCK: usize = 32;

/// Quantizes `x` (a multiple of 32 values) into `d` (one scale per block) and `qs`: the scale
/// is the block's largest magnitude over 127, values round to nearest (as ggml's q8_0).
fn quantize_q8(x: &[f32], d: &mut [f32], qs: &mut [i8]) {
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

/// Quantizes `x` into q4_1 blocks as ggml does: `m` the block's minimum, `d` its range over
/// 15, both stored as f16; value `i` of a block in the low nibble of byte `i` (`i < 16`) or
/// the high nibble of byte `i - 16`. Re-quantizing values dequantized from q4_1 gives back
/// the same blocks, so a GGUF's q4_1 weights survive the f32 round trip of loading.
fn quantize_q41(x: &[f32], d: &mut [f16], m: &mut [f16], qs: &mut [u8]) {
    for (((xb, db), mb), qb) in x
        .chunks_exact(BLOCK)
        .zip(d.iter_mut())
        .zip(m.iter_mut())
        .zip(qs.chunks_exact_mut(BLOCK / 2))
    {
        let lo = xb.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = xb.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let scale = (hi - lo) / 15.0;
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        *db = f16::from_f32(scale);
        *mb = f16::from_f32(lo);
        let q = |v: f32| ((v - lo) * inv + 0.5).clamp(0.0, 15.0) as u8;
        for (i, byte) in qb.iter_mut().enumerate() {
            *byte = q(xb[i]) | (q(xb[i + BLOCK / 2]) << 4);
        }
    }
}

/// A weight's blocks, row `j`'s block `b` at index `j * kb + b`.
enum Blocks {
    Q8 {
        d: Vec<f32>,
        qs: Vec<i8>,
    },
    Q41 {
        d: Vec<f16>,
        m: Vec<f16>,
        qs: Vec<u8>,
    },
}

/// A `(n, k)` weight as 32-value quantized blocks.
pub struct QWeight {
    n: usize,
    k: usize,
    blocks: Blocks,
}

impl QWeight {
    /// From an `(n, k)` f32-convertible weight in `format`; `k` must be a multiple of 32.
    pub fn quantize(w: &Tensor, format: Format) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if k % BLOCK != 0 {
            candle_core::bail!(
                "quantized decode: {k} input features are not a multiple of {BLOCK}"
            );
        }
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let nb = n * k / BLOCK;
        let blocks = match format {
            Format::Q8_0 => {
                let (mut d, mut qs) = (vec![0f32; nb], vec![0i8; n * k]);
                quantize_q8(&data, &mut d, &mut qs);
                Blocks::Q8 { d, qs }
            }
            Format::Q4_1 => {
                let (mut d, mut m) = (vec![f16::ZERO; nb], vec![f16::ZERO; nb]);
                let mut qs = vec![0u8; n * k / 2];
                quantize_q41(&data, &mut d, &mut m, &mut qs);
                Blocks::Q41 { d, m, qs }
            }
        };
        Ok(Self { n, k, blocks })
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn format(&self) -> Format {
        match self.blocks {
            Blocks::Q8 { .. } => Format::Q8_0,
            Blocks::Q41 { .. } => Format::Q4_1,
        }
    }

    /// Weight row `j`'s blocks.
    fn row(&self, j: usize) -> WeightRow<'_> {
        let kb = self.k / BLOCK;
        let b = j * kb..(j + 1) * kb;
        match &self.blocks {
            Blocks::Q8 { d, qs } => WeightRow::Q8 {
                d: &d[b],
                qs: &qs[j * self.k..(j + 1) * self.k],
            },
            Blocks::Q41 { d, m, qs } => WeightRow::Q41 {
                d: &d[b.clone()],
                m: &m[b],
                qs: &qs[j * self.k / 2..(j + 1) * self.k / 2],
            },
        }
    }

    /// `x W^T` for `m` rows of `x` (`m * k` values): `(m, n)` row-major. `kernel` says which
    /// implementation runs; [`Kernel::best`] is the fastest this CPU has.
    pub fn matmul(&self, x: &[f32], m: usize, kernel: Kernel) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        let acts = Acts::quantize(&x[..m * k], m, self.format() == Format::Q4_1);
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
                    let o = &mut out[(j - j0) * m..(j - j0 + 1) * m];
                    kernel.dot_rows(&self.row(j), &acts, o);
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

/// The weight formats our kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q8_0,
    Q4_1,
}

/// One weight row's blocks.
pub enum WeightRow<'a> {
    Q8 {
        d: &'a [f32],
        qs: &'a [i8],
    },
    /// `qs` holds two values a byte (16 bytes a block).
    Q41 {
        d: &'a [f16],
        m: &'a [f16],
        qs: &'a [u8],
    },
}

/// The input rows quantized to q8_0, block `b` of row `r` at index `r * kb + b`.
pub struct Acts {
    pub m: usize,
    pub d: Vec<f32>,
    pub qs: Vec<i8>,
    /// Each block's `d * sum(qs)`: the term a q4_1 block's minimum multiplies (empty unless
    /// asked for: q8_0 weights have no minimum).
    pub s: Vec<f32>,
}

impl Acts {
    fn quantize(x: &[f32], m: usize, sums: bool) -> Self {
        let nb = x.len() / BLOCK;
        let (mut d, mut qs) = (vec![0f32; nb], vec![0i8; x.len()]);
        quantize_q8(x, &mut d, &mut qs);
        let s = match sums {
            true => d
                .iter()
                .zip(qs.chunks_exact(BLOCK))
                .map(|(d, q)| d * q.iter().map(|&v| v as i32).sum::<i32>() as f32)
                .collect(),
            false => Vec::new(),
        };
        Self { m, d, qs, s }
    }
}

/// Which implementation computes the block dots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust: every CPU. The reference the SIMD kernels are held to.
    Portable,
    /// AVX2 + FMA + F16C (x86-64).
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return Self::Avx2;
        }
        Self::Portable
    }

    /// `out[r] = x_r · w` for every row `r` of `acts`.
    fn dot_rows(self, w: &WeightRow, acts: &Acts, out: &mut [f32]) {
        match (self, w) {
            (Self::Portable, WeightRow::Q8 { d, qs }) => portable::q8_rows(d, qs, acts, out),
            (Self::Portable, WeightRow::Q41 { d, m, qs }) => {
                portable::q41_rows(d, m, qs, acts, out)
            }
            // SAFETY: `best` picks Avx2 only where the CPU has AVX2, FMA and F16C; tests pick
            // it only after the same check.
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, WeightRow::Q8 { d, qs }) => unsafe { cpu_avx2::q8_rows(d, qs, acts, out) },
            #[cfg(target_arch = "x86_64")]
            (Self::Avx2, WeightRow::Q41 { d, m, qs }) => unsafe {
                cpu_avx2::q41_rows(d, m, qs, acts, out)
            },
            #[cfg(not(target_arch = "x86_64"))]
            (Self::Avx2, _) => Self::Portable.dot_rows(w, acts, out),
        }
    }
}

/// The sum of a block accumulator's eight lanes, in the order every kernel uses.
#[inline]
pub fn sum_lanes(l: [f32; 8]) -> f32 {
    let a = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    let b = [a[0] + a[2], a[1] + a[3]];
    b[0] + b[1]
}

/// A decode-time product: ours on q8_0 and q4_1 CPU weights, candle's quantized matmul
/// otherwise (other formats, other devices).
pub enum DecodeMatmul {
    Ours(Arc<QWeight>),
    Candle(QMatMul),
}

struct QuantOp {
    w: Arc<QWeight>,
    kernel: Kernel,
}

impl CustomOp1 for QuantOp {
    fn name(&self) -> &'static str {
        "quantized-decode-matmul"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = x else {
            candle_core::bail!("quantized-decode-matmul: input must be f32");
        };
        if !l.is_contiguous() {
            candle_core::bail!("quantized-decode-matmul: input must be contiguous");
        }
        let dims = l.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.w.k {
            candle_core::bail!(
                "quantized-decode-matmul: input has {k} features, weight expects {}",
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
        let format = match dtype {
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            _ => None,
        };
        Ok(match format {
            Some(f) if matches!(w.device(), Device::Cpu) && w.dim(1)? % BLOCK == 0 => {
                Self::Ours(Arc::new(QWeight::quantize(w, f)?))
            }
            _ => Self::Candle(QMatMul::from_qtensor(QTensor::quantize(w, dtype)?)?),
        })
    }

    /// `x W^T` for an f32 `x` (`(..., in)`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Ours(w) => x.contiguous()?.apply_op1_no_bwd(&QuantOp {
                w: w.clone(),
                kernel: Kernel::best(),
            }),
            Self::Candle(q) => candle_core::Module::forward(q, x),
        }
    }
}

#[cfg(test)]
mod tests;
