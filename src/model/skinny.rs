//! f32 products of a few rows (training tokens: ~10-60 during adaptation) with a large frozen
//! row-major weight, on x86-64 CPUs with AVX2 and FMA. At this row count gemm (which candle
//! calls) spends more time packing the weight, a strided scalar copy of the transposed
//! operand on every call, than multiplying; these kernels read each weight row where it lies,
//! once per call. No crate offers small-m products against an unpacked operand, hence the
//! hand-written loops. Callers fall back to candle's matmul when [`fits`] says no.

use candle_core::utils::barrier_pool;

/// Above this many rows gemm's packing pays for itself.
pub const MAX_ROWS: usize = 64;

/// Whether the kernels can take an `m`-row product on this CPU.
pub fn fits(m: usize) -> bool {
    (1..=MAX_ROWS).contains(&m) && simd()
}

#[cfg(target_arch = "x86_64")]
fn simd() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(not(target_arch = "x86_64"))]
fn simd() -> bool {
    false
}

/// Weight rows per task of [`x_wt`]; with [`MAX_ROWS`] input rows a task stays in L1/L2.
const W_ROWS: usize = 4;
/// Weight rows per task of [`g_w`] (`JB * k * 4` bytes: 144 KB at k = 576, in L2).
const JB: usize = 64;

/// `y = x w^T`: `x` is `(m, k)`, `w` `(n, k)`, both row-major; returns `y` `(m, n)`.
/// Panics unless [`fits`]`(m)` and the slices have those sizes.
pub fn x_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(fits(m) && x.len() == m * k && w.len() == n * k);
    let mut y = vec![0f32; m * n];
    let out = OutPtr(y.as_mut_ptr());
    let tiles = n.div_ceil(W_ROWS);
    // candle's pool, not rayon's: its threads are the ones already awake from candle's own
    // ops, and two pools spinning on two cores slow each other.
    barrier_pool().execute_chunked(tiles, |range| {
        let out = &out;
        for t in range {
            let wt = &w[t * W_ROWS * k..((t + 1) * W_ROWS).min(n) * k];
            // SAFETY: `fits` checked AVX2 and FMA; `wt` is whole rows of `w` and `x` is `m`
            // rows, each `k` long. Tile `t` writes only columns `t * W_ROWS..` (at most
            // W_ROWS of them) of `y`, which no other tile writes, and `y` outlives the call.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::dots(x, wt, m, k, out.0.add(t * W_ROWS), n)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("fits() is false off x86-64: {t} {}", wt.len());
        }
    });
    y
}

/// Where tasks of [`x_wt`] write their disjoint columns.
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint elements through it (see `x_wt`).
unsafe impl Sync for OutPtr {}

/// `dx = g w`: `g` is `(m, n)`, `w` `(n, k)`, both row-major; returns `dx` `(m, k)`.
/// Panics unless [`fits`]`(m)` and the slices have those sizes.
pub fn g_w(g: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(fits(m) && g.len() == m * n && w.len() == n * k);
    // Each thread takes a contiguous run of weight-row blocks (sequential reads) and sums into
    // its own `dx`; the partial sums are added at the end.
    let pool = barrier_pool();
    let threads = pool.n_workers() + 1;
    let blocks = n.div_ceil(JB);
    let per = blocks.div_ceil(threads);
    let partials: Vec<std::sync::Mutex<Vec<f32>>> = (0..threads)
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    pool.execute(|tid| {
        let (b0, b1) = ((tid * per).min(blocks), ((tid + 1) * per).min(blocks));
        if b0 == b1 {
            return;
        }
        let mut acc = vec![0f32; m * k];
        for b in b0..b1 {
            let wb = &w[b * JB * k..((b + 1) * JB).min(n) * k];
            // SAFETY: `fits` checked AVX2 and FMA; `wb` is rows `b * JB..` of `w`, `g` has
            // `n` columns and `acc` is `(m, k)`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                x86::axpys(g, wb, b * JB, m, n, k, &mut acc)
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("fits() is false off x86-64: {b} {}", wb.len());
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

#[cfg(target_arch = "x86_64")]
// Register tiles read best indexed by row and lane group.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `out[i * n + r] = dot(x row i, w row r)` for the (at most 4) rows of `w`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots(x: &[f32], w: &[f32], m: usize, k: usize, out: *mut f32, n: usize) {
        let rows = w.len() / k;
        let k8 = k - k % 8;
        // Missing weight rows repeat row 0; their results are not stored.
        let wr: [*const f32; 4] = std::array::from_fn(|r| w.as_ptr().add(r.min(rows - 1) * k));
        let mut i = 0;
        while i < m {
            // Two input rows at a time (the second repeats the first on an odd tail).
            let pair = if i + 1 < m { 2 } else { 1 };
            let x0 = x.as_ptr().add(i * k);
            let x1 = x.as_ptr().add((i + pair - 1) * k);
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut c = 0;
            while c < k8 {
                if i == 0 && c % 16 == 0 {
                    // The next task's rows follow these: fetch them while this tile computes.
                    for r in wr {
                        _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(4 * k + c) as *const i8);
                    }
                }
                let a0 = _mm256_loadu_ps(x0.add(c));
                let a1 = _mm256_loadu_ps(x1.add(c));
                for r in 0..4 {
                    let b = _mm256_loadu_ps(wr[r].add(c));
                    acc[r][0] = _mm256_fmadd_ps(a0, b, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(a1, b, acc[r][1]);
                }
                c += 8;
            }
            for r in 0..rows {
                for p in 0..pair {
                    let xp = if p == 0 { x0 } else { x1 };
                    let mut s = hsum(acc[r][p]);
                    for cc in k8..k {
                        s += *xp.add(cc) * *wr[r].add(cc);
                    }
                    *out.add((i + p) * n + r) = s;
                }
            }
            i += pair;
        }
    }

    /// `acc (m, k) += g[:, j0..j0 + rows] wb`, `wb` being `rows` weight rows from `j0`; four
    /// rows of `g` by 16 columns at a time, accumulated in registers over the block.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpys(
        g: &[f32],
        wb: &[f32],
        j0: usize,
        m: usize,
        n: usize,
        k: usize,
        acc: &mut [f32],
    ) {
        let rows = wb.len() / k;
        let k16 = k - k % 16;
        let (gp, wp, op) = (g.as_ptr().add(j0), wb.as_ptr(), acc.as_mut_ptr());
        let mut i = 0;
        while i < m {
            let tile = (m - i).min(4);
            // Rows past the tile repeat its first row; their sums are not stored.
            let gr: [*const f32; 4] =
                std::array::from_fn(|r| gp.add((i + if r < tile { r } else { 0 }) * n));
            let mut c = 0;
            while c < k16 {
                let mut s = [[_mm256_setzero_ps(); 2]; 4];
                for j in 0..rows {
                    let b0 = _mm256_loadu_ps(wp.add(j * k + c));
                    let b1 = _mm256_loadu_ps(wp.add(j * k + c + 8));
                    for r in 0..4 {
                        let a = _mm256_broadcast_ss(&*gr[r].add(j));
                        s[r][0] = _mm256_fmadd_ps(a, b0, s[r][0]);
                        s[r][1] = _mm256_fmadd_ps(a, b1, s[r][1]);
                    }
                }
                for r in 0..tile {
                    let o = op.add((i + r) * k + c);
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), s[r][0]));
                    _mm256_storeu_ps(o.add(8), _mm256_add_ps(_mm256_loadu_ps(o.add(8)), s[r][1]));
                }
                c += 16;
            }
            for r in 0..tile {
                for cc in k16..k {
                    let mut s = 0f32;
                    for j in 0..rows {
                        s += *gr[r].add(j) * *wp.add(j * k + cc);
                    }
                    *op.add((i + r) * k + cc) += s;
                }
            }
            i += tile;
        }
    }
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
            let y = x_wt(&x, &w, m, k, n);
            let mut want = vec![0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k)
                        .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                        .sum();
                }
            }
            close(&y, &want);
            let dx = g_w(&g, &w, m, n, k);
            let mut want = vec![0f64; m * k];
            for i in 0..m {
                for c in 0..k {
                    want[i * k + c] = (0..n)
                        .map(|j| g[i * n + j] as f64 * w[j * k + c] as f64)
                        .sum();
                }
            }
            close(&dx, &want);
        }
    }

    #[test]
    fn only_few_rows_fit() {
        assert!(!fits(0));
        assert!(!fits(MAX_ROWS + 1));
    }
}
