//! The f32 products of [`super`] on CPUs with AVX2 and FMA.

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

/// `out[r * k + c] (+)= sum_i g[i, j0 + r] x[i, c]` for `rows` (at most 2) weight-gradient
/// rows from `j0`: `g` is `(m, n)`, `x` `(m, k)`, `out` addresses `rows` rows of `k`; with
/// `add` the sums are added to what `out` holds, else they overwrite it (never read: `out`
/// may be uninitialised).
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn outer(
    g: &[f32],
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    j0: usize,
    rows: usize,
    op: *mut f32,
    add: bool,
) {
    let k32 = k - k % 32;
    // A missing second row repeats the first; its sums are not stored.
    let j1 = j0 + rows.min(2) - 1;
    let (gp, xp) = (g.as_ptr(), x.as_ptr());
    let mut c = 0;
    while c < k32 {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        for i in 0..m {
            let xs: [__m256; 4] =
                std::array::from_fn(|v| _mm256_loadu_ps(xp.add(i * k + c + 8 * v)));
            let a = [
                _mm256_broadcast_ss(&*gp.add(i * n + j0)),
                _mm256_broadcast_ss(&*gp.add(i * n + j1)),
            ];
            for r in 0..2 {
                for v in 0..4 {
                    acc[r][v] = _mm256_fmadd_ps(a[r], xs[v], acc[r][v]);
                }
            }
        }
        for r in 0..rows {
            for v in 0..4 {
                let dst = op.add(r * k + c + 8 * v);
                let sum = if add {
                    _mm256_add_ps(_mm256_loadu_ps(dst), acc[r][v])
                } else {
                    acc[r][v]
                };
                _mm256_storeu_ps(dst, sum);
            }
        }
        c += 32;
    }
    for r in 0..rows {
        for cc in k32..k {
            let mut s = 0f32;
            for i in 0..m {
                s += *gp.add(i * n + j0 + r) * *xp.add(i * k + cc);
            }
            let dst = op.add(r * k + cc);
            *dst = if add { *dst + s } else { s };
        }
    }
}
