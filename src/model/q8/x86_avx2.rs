//! The q8_0 block dot with AVX2 and FMA, on x86-64 CPUs that have both ([`super::Kernel::best`]).
//! Rows are tiled four at a time: each weight block is loaded once for the tile. Tested
//! against [`super::portable`] for bit equality.

use std::arch::x86_64::*;

use super::{sum_lanes, Acts, WeightRow, BLOCK};

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_rows(w: &WeightRow, acts: &Acts, out: &mut [f32]) {
    let mut r = 0;
    while r + 4 <= acts.m {
        tile::<4>(w, acts, r, out);
        r += 4;
    }
    while r < acts.m {
        tile::<1>(w, acts, r, out);
        r += 1;
    }
}

/// Rows `r0..r0 + R`.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const R: usize>(w: &WeightRow, acts: &Acts, r0: usize, out: &mut [f32]) {
    let kb = w.d.len();
    assert!(w.qs.len() >= kb * BLOCK && (r0 + R) * kb <= acts.d.len());
    assert!(acts.qs.len() >= (r0 + R) * kb * BLOCK && out.len() >= r0 + R);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..kb {
        // SAFETY (all loads): in bounds by the asserts above.
        let wv = _mm256_loadu_si256(w.qs.as_ptr().add(b * BLOCK) as *const __m256i);
        // |w| as the unsigned operand, w's sign moved onto x: the products are w * x.
        let aw = _mm256_sign_epi8(wv, wv);
        let dw = *w.d.get_unchecked(b);
        for (t, a) in acc.iter_mut().enumerate() {
            let i = (r0 + t) * kb + b;
            let xv = _mm256_loadu_si256(acts.qs.as_ptr().add(i * BLOCK) as *const __m256i);
            let sx = _mm256_sign_epi8(xv, wv);
            // Pairs into i16 (|w|, |x| <= 127: no saturation), then fours into i32 lanes.
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
            let scale = _mm256_set1_ps(dw * *acts.d.get_unchecked(i));
            *a = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), *a);
        }
    }
    for (t, a) in acc.iter().enumerate() {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
        out[r0 + t] = sum_lanes(lanes);
    }
}
