//! Products of a few rows (training tokens: ~10-60 during adaptation) with a large frozen
//! row-major weight on x86-64 CPUs. At this row count gemm (which candle calls) spends more
//! time packing the weight, a strided scalar copy of the transposed operand on every call,
//! than multiplying; these kernels read each weight row where it lies, once per call. No crate
//! offers small-m products against an unpacked operand, hence the hand-written loops. Callers
//! fall back to candle's matmul when [`fits`] says no.
//!
//! Two precisions: f32 throughout (AVX2 + FMA), and bf16 operands with f32 sums (AVX-512
//! BF16), which adaptation opts into: twice the multiply-adds per cycle and half the weight
//! bytes, at bf16 rounding of weights and activations (the precision SmolLM2 was trained in).

use candle_core::utils::barrier_pool;
use half::bf16;

#[cfg(target_arch = "x86_64")]
// Register tiles read best indexed by row and lane group.
#[allow(clippy::needless_range_loop)]
mod cpu_avx2;
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
mod cpu_avx512;

/// Above this many rows gemm's packing pays for itself.
pub const MAX_ROWS: usize = 64;

/// Whether the f32 kernels can take an `m`-row product on this CPU.
pub fn fits(m: usize) -> bool {
    (1..=MAX_ROWS).contains(&m) && features().0
}

/// Whether the bf16 kernels can take an `m`-row product on this CPU.
pub fn fits_bf16(m: usize) -> bool {
    (1..=MAX_ROWS).contains(&m) && features().1
}

/// (AVX2 + FMA, AVX-512 BF16), detected once.
#[cfg(target_arch = "x86_64")]
fn features() -> (bool, bool) {
    static F: std::sync::OnceLock<(bool, bool)> = std::sync::OnceLock::new();
    *F.get_or_init(|| {
        (
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16"),
        )
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn features() -> (bool, bool) {
    (false, false)
}

/// Weight rows per task of the forward product; with [`MAX_ROWS`] input rows a task's
/// operands stay in L1/L2.
const W_ROWS: usize = 4;
/// Weight rows per task of the input-gradient product (`JB * k * 4` bytes: 144 KB at
/// k = 576, in L2). Even, so bf16 row pairs never straddle two tasks.
const JB: usize = 64;

/// Where tasks write their disjoint columns of the output.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (see `forward`).
unsafe impl Sync for OutPtr {}

/// `y (m, n)`, tile by tile of W_ROWS weight rows: `tile(t, rows of w, out)` writes columns
/// `t * W_ROWS..` of `y` through `out` (row stride `n`).
fn forward<T: Sync>(
    w: &[T],
    k: usize,
    m: usize,
    n: usize,
    tile: impl Fn(&[T], *mut f32) + Sync,
) -> Vec<f32> {
    // Every element is written by exactly one tile: no zero fill.
    let mut y = Vec::with_capacity(m * n);
    let out = OutPtr(y.as_mut_ptr());
    // candle's pool, not rayon's: its threads are the ones already awake from candle's own
    // ops, and two pools spinning on two cores slow each other.
    barrier_pool().execute_chunked(n.div_ceil(W_ROWS), |range| {
        let out = &out;
        for t in range {
            let rows = &w[t * W_ROWS * k..((t + 1) * W_ROWS).min(n) * k];
            // Columns `t * W_ROWS..` lie within `y`'s first row.
            tile(rows, out.0.wrapping_add(t * W_ROWS));
        }
    });
    // SAFETY: the tiles wrote all `m * n` elements.
    unsafe { y.set_len(m * n) };
    y
}

/// `dx (m, k)` summed over blocks of at most JB weight rows: each thread takes an equal
/// contiguous run of rows (sequential reads; equal, as the others wait for the last) and sums
/// `block(j0, rows from j0, acc)` into its own `dx`; the partial sums are added at the end.
fn input_grad<T: Sync>(
    w: &[T],
    n: usize,
    k: usize,
    m: usize,
    block: impl Fn(usize, &[T], &mut [f32]) + Sync,
) -> Vec<f32> {
    let pool = barrier_pool();
    let threads = pool.n_workers() + 1;
    // An even number of rows each, so bf16 row pairs never straddle two threads.
    let per = n.div_ceil(threads).next_multiple_of(2);
    let partials: Vec<std::sync::Mutex<Vec<f32>>> = (0..threads)
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    pool.execute(|tid| {
        let (r0, r1) = ((tid * per).min(n), ((tid + 1) * per).min(n));
        if r0 == r1 {
            return;
        }
        let mut acc = vec![0f32; m * k];
        for j0 in (r0..r1).step_by(JB) {
            block(j0, &w[j0 * k..(j0 + JB).min(r1) * k], &mut acc);
        }
        *partials[tid].lock().unwrap_or_else(|e| e.into_inner()) = acc;
    });
    let mut parts = partials
        .into_iter()
        .map(|p| p.into_inner().unwrap_or_else(|e| e.into_inner()))
        .filter(|p| !p.is_empty());
    let mut dx = parts.next().unwrap_or_else(|| vec![0f32; m * k]);
    for p in parts {
        dx.iter_mut().zip(&p).for_each(|(a, b)| *a += b);
    }
    dx
}

/// `y = x w^T`: `x` is `(m, k)`, `w` `(n, k)`, both row-major; returns `y` `(m, n)`.
/// Panics unless [`fits`]`(m)` and the slices have those sizes.
pub fn x_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(fits(m) && x.len() == m * k && w.len() == n * k);
    forward(w, k, m, n, |rows, out| {
        // SAFETY: `fits` checked AVX2 and FMA; `rows` is whole rows of `w`, `x` is `m` rows
        // of `k`, and `out` addresses columns of `y` that only this tile writes.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            cpu_avx2::dots(x, rows, m, k, out, n)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "fits() is false off x86-64: {} {}",
            rows.len(),
            out as usize
        );
    })
}

/// `dx = g w`: `g` is `(m, n)`, `w` `(n, k)`, both row-major; returns `dx` `(m, k)`.
/// Panics unless [`fits`]`(m)` and the slices have those sizes.
pub fn g_w(g: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(fits(m) && g.len() == m * n && w.len() == n * k);
    input_grad(w, n, k, m, |j0, rows, acc| {
        // SAFETY: `fits` checked AVX2 and FMA; `rows` is rows `j0..` of `w`, `g` has `n`
        // columns and `acc` is `(m, k)`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            cpu_avx2::axpys(g, rows, j0, m, n, k, acc)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "fits() is false off x86-64: {j0} {} {}",
            rows.len(),
            acc.len()
        );
    })
}

/// `dw = g^T x`, the gradient of a trained weight: `g` is `(m, n)`, `x` `(m, k)`, both
/// row-major; returns `dw` `(n, k)`. Panics unless [`fits`]`(m)` and the slices have those
/// sizes.
pub fn gt_x(g: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut dw = Vec::with_capacity(n * k);
    // SAFETY: `dw` has room for `n * k` elements, and without `add` they are only written.
    unsafe { gt_x_raw(g, x, m, n, k, dw.as_mut_ptr(), false) };
    // SAFETY: every element was written above.
    unsafe { dw.set_len(n * k) };
    dw
}

/// `dw += g^T x` ([`gt_x`] added into `dw`, `n * k` elements).
pub fn gt_x_add(g: &[f32], x: &[f32], m: usize, n: usize, k: usize, dw: &mut [f32]) {
    assert_eq!(dw.len(), n * k);
    // SAFETY: `dw` holds `n * k` initialised elements.
    unsafe { gt_x_raw(g, x, m, n, k, dw.as_mut_ptr(), true) };
}

/// `g^T x` written (or with `add`, added) to the `n * k` elements at `dw`.
///
/// # Safety
/// `dw` must be valid for writes of `n * k` elements (and initialised when `add`).
unsafe fn gt_x_raw(g: &[f32], x: &[f32], m: usize, n: usize, k: usize, dw: *mut f32, add: bool) {
    assert!(fits(m) && g.len() == m * n && x.len() == m * k);
    let out = OutPtr(dw);
    barrier_pool().execute_chunked(n.div_ceil(2), |range| {
        let out = &out;
        for t in range {
            let j0 = t * 2;
            let rows = 2.min(n - j0);
            // SAFETY: `fits` checked AVX2 and FMA; `g` is `(m, n)` and `x` `(m, k)`; rows
            // `j0..j0 + rows` of `dw` belong to this pair only.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                cpu_avx2::outer(g, x, m, n, k, j0, rows, out.0.add(j0 * k), add)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("fits() is false off x86-64: {rows} {} {add}", x.len());
        }
    });
}

/// A weight's elements as the kernels take them: f32, or bf16 bits.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'a> Weight<'a> {
    /// Calls `f` with `w`'s elements when it is a contiguous f32 or bf16 CPU tensor.
    pub fn of<R>(w: &candle_core::Tensor, f: impl FnOnce(Weight) -> R) -> Option<R> {
        use candle_core::{CpuStorage, Storage};
        use half::slice::HalfFloatSliceExt;
        let (storage, layout) = w.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(f(Weight::F32(&v[a..b]))),
            (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
                Some(f(Weight::Bf16(v[a..b].reinterpret_cast())))
            }
            _ => None,
        }
    }

    /// Whether this weight's kernels take an `m`-row product on this CPU.
    pub fn fits(self, m: usize) -> bool {
        match self {
            Weight::F32(_) => fits(m),
            Weight::Bf16(_) => fits_bf16(m),
        }
    }

    /// Rows `rows` of a weight `k` wide.
    pub fn rows(self, rows: std::ops::Range<usize>, k: usize) -> Weight<'a> {
        match self {
            Weight::F32(w) => Weight::F32(&w[rows.start * k..rows.end * k]),
            Weight::Bf16(w) => Weight::Bf16(&w[rows.start * k..rows.end * k]),
        }
    }

    /// [`x_wt`] or [`x_wt_bf16`] with this weight.
    pub fn x_wt(self, x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        match self {
            Weight::F32(w) => x_wt(x, w, m, k, n),
            Weight::Bf16(w) => x_wt_bf16(x, w, m, k, n),
        }
    }

    /// [`g_w`] or [`g_w_bf16`] with this weight.
    pub fn g_w(self, g: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        match self {
            Weight::F32(w) => g_w(g, w, m, n, k),
            Weight::Bf16(w) => g_w_bf16(g, w, m, n, k),
        }
    }
}

/// The weight the kernels take for an `m`-row product: the bf16 copy `wb` where it fits, else
/// `w` where it fits; `None` to use gemm.
pub fn pick<'a>(
    w: &'a candle_core::Tensor,
    wb: Option<&'a candle_core::Tensor>,
    m: usize,
) -> Option<&'a candle_core::Tensor> {
    match wb {
        Some(wb) if fits_bf16(m) => Some(wb),
        _ if fits(m) => Some(w),
        _ => None,
    }
}

/// bf16 bits of `v`, rounded to nearest even, each row padded with zeros to `stride`.
/// Only called where [`fits_bf16`] holds.
fn to_bf16(v: &[f32], cols: usize, stride: usize) -> Vec<u16> {
    assert!(cols <= stride && v.len().is_multiple_of(cols.max(1)));
    let len = v.len() / cols.max(1) * stride;
    // Written row by row, padding included: no zero fill first.
    let mut out: Vec<u16> = Vec::with_capacity(len);
    for (r, src) in v.chunks(cols).enumerate() {
        // SAFETY: row r's `stride` elements lie within the capacity `len`.
        let dst = unsafe { out.as_mut_ptr().add(r * stride) };
        // SAFETY: callers checked `fits_bf16`, hence AVX-512 F, BW and BF16.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            cpu_avx512::to_bf16(src, dst)
        };
        #[cfg(not(target_arch = "x86_64"))]
        for (j, s) in src.iter().enumerate() {
            // SAFETY: as above.
            unsafe { dst.add(j).write(bf16::from_f32(*s).to_bits()) };
        }
        for j in cols..stride {
            // SAFETY: as above.
            unsafe { dst.add(j).write(0) };
        }
    }
    // SAFETY: every row's `stride` elements were written.
    unsafe { out.set_len(len) };
    out
}

/// [`x_wt`] with `w` as bf16 bits and `x` rounded to bf16; sums in f32.
/// Panics unless [`fits_bf16`]`(m)` and the slices have those sizes.
pub fn x_wt_bf16(x: &[f32], w: &[u16], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(fits_bf16(m) && x.len() == m * k && w.len() == n * k);
    let xb = to_bf16(x, k, k);
    forward(w, k, m, n, |rows, out| {
        // SAFETY: `fits_bf16` checked AVX-512 F, BW and BF16; as in `x_wt`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            cpu_avx512::dots(&xb, rows, m, k, out, n)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "fits_bf16() is false off x86-64: {} {} {}",
            rows.len(),
            out as usize,
            xb.len()
        );
    })
}

/// [`g_w`] with `w` as bf16 bits and `g` rounded to bf16; sums in f32.
/// Panics unless [`fits_bf16`]`(m)` and the slices have those sizes.
pub fn g_w_bf16(g: &[f32], w: &[u16], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(fits_bf16(m) && g.len() == m * n && w.len() == n * k);
    // Weight rows go in pairs: an odd last row is paired with a zero gradient column.
    let ns = n + n % 2;
    let gb = to_bf16(g, n, ns);
    let even = n - n % 2;
    let mut dx = input_grad(&w[..even * k], even, k, m, |j0, rows, acc| {
        // SAFETY: `fits_bf16` checked AVX-512 F, BW and BF16; `rows` is an even number of
        // rows from `j0` (even), `gb` has the even row stride `ns` and `acc` is `(m, k)`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            cpu_avx512::axpys(&gb, rows, j0, m, ns, k, acc)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "fits_bf16() is false off x86-64: {j0} {} {}",
            rows.len(),
            acc.len()
        );
    });
    if n % 2 == 1 {
        let last = &w[even * k..];
        for i in 0..m {
            let a = bf16::from_bits(gb[i * ns + even]).to_f32();
            for (d, &v) in dx[i * k..(i + 1) * k].iter_mut().zip(last) {
                *d += a * bf16::from_bits(v).to_f32();
            }
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8;
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `out (rows, cols)[i, j] = sum_c a(i, c) b(c, j)` in f64.
    fn product(
        rows: usize,
        cols: usize,
        inner: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut out = vec![0f64; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                out[i * cols + j] = (0..inner).map(|c| a(i, c) * b(c, j)).sum();
            }
        }
        out
    }

    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (*x as f64 - y).abs() < 1e-3 * (1.0 + y.abs()),
                "{i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn both_products_match_a_plain_loop_for_every_tail() {
        if !fits(1) {
            return; // Not an AVX2 CPU: callers never reach the kernels.
        }
        // Odd rows, weight rows not a multiple of 4, widths not multiples of 8 or 16.
        for &(m, k, n) in &[
            (1, 8, 1),
            (3, 19, 5),
            (7, 576, 13),
            (64, 40, 300),
            (10, 33, 517),
        ] {
            let (x, w, g) = (data(m * k, 1), data(n * k, 2), data(m * n, 3));
            let f = |v: &[f32], i: usize| v[i] as f64;
            let want = product(m, n, k, |i, c| f(&x, i * k + c), |c, j| f(&w, j * k + c));
            close(&x_wt(&x, &w, m, k, n), &want);
            let want = product(m, k, n, |i, j| f(&g, i * n + j), |j, c| f(&w, j * k + c));
            close(&g_w(&g, &w, m, n, k), &want);
            let want = product(n, k, m, |j, i| f(&g, i * n + j), |i, c| f(&x, i * k + c));
            close(&gt_x(&g, &x, m, n, k), &want);
        }
    }

    #[test]
    fn bf16_products_match_a_plain_loop_on_the_rounded_operands() {
        if !fits_bf16(1) {
            return; // No AVX-512 BF16: callers never reach these kernels.
        }
        let round =
            |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| bf16::from_f32(x).to_f64()).collect() };
        // Odd n (an unpaired weight row), widths around the 16/32-lane masks.
        for &(m, k, n) in &[
            (1, 8, 1),
            (3, 19, 5),
            (5, 48, 131),
            (64, 576, 66),
            (10, 33, 517),
        ] {
            let (x, w, g) = (data(m * k, 1), data(n * k, 2), data(m * n, 3));
            let wb: Vec<u16> = w.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            let (xr, wr, gr) = (round(&x), round(&w), round(&g));
            let want = product(m, n, k, |i, c| xr[i * k + c], |c, j| wr[j * k + c]);
            close(&x_wt_bf16(&x, &wb, m, k, n), &want);
            let want = product(m, k, n, |i, j| gr[i * n + j], |j, c| wr[j * k + c]);
            close(&g_w_bf16(&g, &wb, m, n, k), &want);
        }
    }

    #[test]
    fn only_few_rows_fit() {
        assert!(!fits(0));
        assert!(!fits(MAX_ROWS + 1));
        assert!(!fits_bf16(0) && !fits_bf16(MAX_ROWS + 1));
    }
}
