//! The block dots with AVX2, FMA and F16C, on x86-64 CPUs that have all three
//! ([`super::Kernel::best`]). Rows are tiled four at a time: each weight block is loaded (and
//! a q4_1 block unpacked) once for the tile. Tested against [`super::portable`] for bit
//! equality.

use std::arch::x86_64::*;

use half::f16;

use super::{sum_lanes, Acts, BLOCK};

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn q8_rows(wd: &[f32], wq: &[i8], acts: &Acts, out: &mut [f32]) {
    let mut r = 0;
    while r + 4 <= acts.m {
        q8_tile::<4>(wd, wq, acts, r, out);
        r += 4;
    }
    while r < acts.m {
        q8_tile::<1>(wd, wq, acts, r, out);
        r += 1;
    }
}

/// Rows `r0..r0 + R`.
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_tile<const R: usize>(wd: &[f32], wq: &[i8], acts: &Acts, r0: usize, out: &mut [f32]) {
    let kb = wd.len();
    assert!(wq.len() >= kb * BLOCK && (r0 + R) * kb <= acts.d.len());
    assert!(acts.qs.len() >= (r0 + R) * kb * BLOCK && out.len() >= r0 + R);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..kb {
        // SAFETY (all loads): in bounds by the asserts above.
        let wv = _mm256_loadu_si256(wq.as_ptr().add(b * BLOCK) as *const __m256i);
        // |w| as the unsigned operand, w's sign moved onto x: the products are w * x.
        let aw = _mm256_sign_epi8(wv, wv);
        let dw = *wd.get_unchecked(b);
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

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q41_rows(wd: &[f16], wm: &[f16], wq: &[u8], acts: &Acts, out: &mut [f32]) {
    let mut r = 0;
    while r + 4 <= acts.m {
        q41_tile::<4>(wd, wm, wq, acts, r, out);
        r += 4;
    }
    while r < acts.m {
        q41_tile::<1>(wd, wm, wq, acts, r, out);
        r += 1;
    }
}

/// An f16 as f32 (exact, as `half`'s conversion).
#[target_feature(enable = "f16c")]
unsafe fn f16_to_f32(v: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(v.to_bits() as i32)))
}

/// Rows `r0..r0 + R`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q41_tile<const R: usize>(
    wd: &[f16],
    wm: &[f16],
    wq: &[u8],
    acts: &Acts,
    r0: usize,
    out: &mut [f32],
) {
    let kb = wd.len();
    assert!(wm.len() == kb && wq.len() >= kb * BLOCK / 2 && (r0 + R) * kb <= acts.d.len());
    assert!(acts.qs.len() >= (r0 + R) * kb * BLOCK && acts.s.len() >= (r0 + R) * kb);
    assert!(out.len() >= r0 + R);
    let ones = _mm256_set1_epi16(1);
    let low = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins = [0f32; R];
    for b in 0..kb {
        // SAFETY (all loads): in bounds by the asserts above.
        let packed = _mm_loadu_si128(wq.as_ptr().add(b * BLOCK / 2) as *const __m128i);
        // Values 0..16 from the low nibbles, 16..32 from the high ones: in block order.
        let wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed), low);
        let dw = f16_to_f32(*wd.get_unchecked(b));
        let mw = f16_to_f32(*wm.get_unchecked(b));
        for t in 0..R {
            let i = (r0 + t) * kb + b;
            let xv = _mm256_loadu_si256(acts.qs.as_ptr().add(i * BLOCK) as *const __m256i);
            // w in 0..15 is the unsigned operand: pairs into i16 (no saturation), fours into
            // i32 lanes.
            let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wv, xv), ones);
            let scale = _mm256_set1_ps(dw * *acts.d.get_unchecked(i));
            acc[t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[t]);
            mins[t] = mw.mul_add(*acts.s.get_unchecked(i), mins[t]);
        }
    }
    for t in 0..R {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc[t]);
        out[r0 + t] = sum_lanes(lanes) + mins[t];
    }
}
