//! The block dots in plain Rust: used where no SIMD kernel applies, and the reference the SIMD
//! kernels must equal bit for bit. Their arithmetic spells out the SIMD kernels': per block,
//! eight lanes each summing four integer products exactly, scaled and fused-multiply-added
//! into that lane's f32 accumulator; the eight lanes summed once at the end
//! ([`super::sum_lanes`]). A q4_1 block's minimum adds `m * (d_x * sum(x_q))` to one more
//! accumulator, added after the lanes.

use half::f16;

use super::{sum_lanes, Acts, BLOCK};

pub fn q8_rows(wd: &[f32], wq: &[i8], acts: &Acts, out: &mut [f32]) {
    let kb = wd.len();
    for (r, o) in out.iter_mut().enumerate().take(acts.m) {
        let mut acc = [0f32; 8];
        for b in 0..kb {
            let w = &wq[b * BLOCK..(b + 1) * BLOCK];
            let x = &acts.qs[(r * kb + b) * BLOCK..(r * kb + b + 1) * BLOCK];
            let scale = wd[b] * acts.d[r * kb + b];
            for (lane, a) in acc.iter_mut().enumerate() {
                let i: i32 = (4 * lane..4 * lane + 4)
                    .map(|e| w[e] as i32 * x[e] as i32)
                    .sum();
                *a = scale.mul_add(i as f32, *a);
            }
        }
        *o = sum_lanes(acc);
    }
}

/// Value `e` (0..32) of a q4_1 block's 16 bytes.
fn nibble(qs: &[u8], e: usize) -> i32 {
    let half = BLOCK / 2;
    if e < half {
        (qs[e] & 0x0F) as i32
    } else {
        (qs[e - half] >> 4) as i32
    }
}

pub fn q41_rows(wd: &[f16], wm: &[f16], wq: &[u8], acts: &Acts, out: &mut [f32]) {
    let kb = wd.len();
    for (r, o) in out.iter_mut().enumerate().take(acts.m) {
        let mut acc = [0f32; 8];
        let mut mins = 0f32;
        for b in 0..kb {
            let w = &wq[b * BLOCK / 2..(b + 1) * BLOCK / 2];
            let i = r * kb + b;
            let x = &acts.qs[i * BLOCK..(i + 1) * BLOCK];
            let scale = wd[b].to_f32() * acts.d[i];
            for (lane, a) in acc.iter_mut().enumerate() {
                let dot: i32 = (4 * lane..4 * lane + 4)
                    .map(|e| nibble(w, e) * x[e] as i32)
                    .sum();
                *a = scale.mul_add(dot as f32, *a);
            }
            mins = wm[b].to_f32().mul_add(acts.s[i], mins);
        }
        *o = sum_lanes(acc) + mins;
    }
}
