//! The products of [`super`] with bf16 operands and f32 sums, on CPUs with AVX-512 BF16
//! (`vdpbf16ps`: twice the multiply-adds of f32 FMA per cycle on the same core).

use std::arch::x86_64::*;

/// Writes the bf16 bits of `src[i]` to `dst + i`, rounded to nearest even, 16 at a time
/// (`vcvtneps2bf16`, which also flushes subnormals to zero). `dst` must be valid for
/// `src.len()` writes.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn to_bf16(src: &[f32], dst: *mut u16) {
    let n = src.len();
    let mut i = 0;
    while i + 16 <= n {
        let b: __m256bh = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
        _mm256_storeu_si256(
            dst.add(i) as *mut __m256i,
            std::mem::transmute::<__m256bh, __m256i>(b),
        );
        i += 16;
    }
    for (j, s) in src.iter().enumerate().skip(i) {
        dst.add(j).write(half::bf16::from_f32(*s).to_bits());
    }
}

/// `out[i * n + r] = dot(x row i, w row r)` for the (at most 4) rows of `w`; `x` and `w` are
/// bf16 bits. Three rows of `x` at a time against the four of `w`: 12 sums from 7 loads per
/// step (2 rows: 8 from 6; 4 rows ran no faster). Columns past a multiple of 32 are read under
/// a mask (zeros), outside the main loop.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub unsafe fn dots(x: &[u16], w: &[u16], m: usize, k: usize, out: *mut f32, n: usize) {
    const P: usize = 3;
    let rows = w.len() / k;
    let wr: [*const u16; 4] = std::array::from_fn(|r| w.as_ptr().add(r.min(rows - 1) * k));
    let full = k / 32 * 32;
    let tail: __mmask32 = if k > full {
        (1u32 << (k - full)) - 1
    } else {
        0
    };
    let mut i = 0;
    while i < m {
        let cnt = (m - i).min(P);
        // Past the last row of x, repeat it (its sums are not stored).
        let xr: [*const u16; P] = std::array::from_fn(|p| x.as_ptr().add((i + p.min(cnt - 1)) * k));
        let mut acc = [[_mm512_setzero_ps(); P]; 4];
        let mut c = 0;
        while c < full {
            if i == 0 && c % 64 == 0 {
                // The next task's rows follow these: fetch them while this tile computes.
                for r in wr {
                    _mm_prefetch::<_MM_HINT_T0>(r.wrapping_add(4 * k + c) as *const i8);
                }
            }
            let a: [__m512bh; P] =
                std::array::from_fn(|p| std::mem::transmute(_mm512_loadu_si512(xr[p].add(c) as _)));
            for r in 0..4 {
                let b: __m512bh = std::mem::transmute(_mm512_loadu_si512(wr[r].add(c) as _));
                for p in 0..P {
                    acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a[p], b);
                }
            }
            c += 32;
        }
        if tail != 0 {
            let a: [__m512bh; P] = std::array::from_fn(|p| {
                std::mem::transmute(_mm512_maskz_loadu_epi16(tail, xr[p].add(c) as _))
            });
            for r in 0..4 {
                let b: __m512bh =
                    std::mem::transmute(_mm512_maskz_loadu_epi16(tail, wr[r].add(c) as _));
                for p in 0..P {
                    acc[r][p] = _mm512_dpbf16_ps(acc[r][p], a[p], b);
                }
            }
        }
        for r in 0..rows {
            for p in 0..cnt {
                *out.add((i + p) * n + r) = _mm512_reduce_add_ps(acc[r][p]);
            }
        }
        i += cnt;
    }
}

/// `acc (m, k) += g[:, j0..j0 + rows] wb` with `wb` the `rows` (even) bf16 weight rows from
/// `j0` and `g` the bf16 gradient with an even row stride `ns`. Two weight rows are
/// interleaved so one `vdpbf16ps` sums over both; the interleave works within 128-bit lanes,
/// which the stores undo.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn axpys(
    g: &[u16],
    wb: &[u16],
    j0: usize,
    m: usize,
    ns: usize,
    k: usize,
    acc: &mut [f32],
) {
    let rows = wb.len() / k;
    debug_assert!(rows.is_multiple_of(2) && ns.is_multiple_of(2) && j0.is_multiple_of(2));
    // lo holds columns 8L + 0..4 of each 128-bit lane L, hi columns 8L + 4..8.
    let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    let second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    let (wp, op) = (wb.as_ptr(), acc.as_mut_ptr());
    // Six rows of g per pass over the weight block (four: 2-20% slower at 12-24 rows).
    const T: usize = 6;
    let mut i = 0;
    while i < m {
        let tile = (m - i).min(T);
        // Pairs (g[i, j], g[i, j + 1]) as one 32-bit word; rows past the tile repeat row i.
        let gr: [*const u32; T] = std::array::from_fn(|r| {
            g.as_ptr().add((i + if r < tile { r } else { 0 }) * ns + j0) as *const u32
        });
        let mut c = 0;
        while c < k {
            let left = k - c;
            let mask: __mmask32 = if left >= 32 { !0 } else { (1u32 << left) - 1 };
            let mut s = [[_mm512_setzero_ps(); 2]; T];
            let mut j = 0;
            while j < rows {
                let r0 = _mm512_maskz_loadu_epi16(mask, wp.add(j * k + c) as _);
                let r1 = _mm512_maskz_loadu_epi16(mask, wp.add((j + 1) * k + c) as _);
                let lo: __m512bh = std::mem::transmute(_mm512_unpacklo_epi16(r0, r1));
                let hi: __m512bh = std::mem::transmute(_mm512_unpackhi_epi16(r0, r1));
                for r in 0..T {
                    let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(
                        gr[r].add(j / 2).read_unaligned() as i32,
                    ));
                    s[r][0] = _mm512_dpbf16_ps(s[r][0], a, lo);
                    s[r][1] = _mm512_dpbf16_ps(s[r][1], a, hi);
                }
                j += 2;
            }
            let (m0, m1): (__mmask16, __mmask16) = (
                if left >= 16 {
                    !0
                } else {
                    ((1u32 << left) - 1) as u16
                },
                if left >= 32 {
                    !0
                } else if left > 16 {
                    ((1u32 << (left - 16)) - 1) as u16
                } else {
                    0
                },
            );
            for r in 0..tile {
                let o = op.add((i + r) * k + c);
                // Past the row's end when fewer than 17 columns are left: masked off.
                let o16 = o.wrapping_add(16);
                let v0 = _mm512_permutex2var_ps(s[r][0], first, s[r][1]);
                let v1 = _mm512_permutex2var_ps(s[r][0], second, s[r][1]);
                _mm512_mask_storeu_ps(o, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, o), v0));
                _mm512_mask_storeu_ps(o16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, o16), v1));
            }
            c += 32;
        }
        i += tile;
    }
}
