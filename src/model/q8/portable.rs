//! The q8_0 block dot in plain Rust: used where no SIMD kernel applies, and the reference the
//! SIMD kernels must equal bit for bit. Its arithmetic spells out theirs: per block, eight
//! lanes each summing four integer products exactly, scaled and fused-multiply-added into
//! that lane's f32 accumulator; the eight lanes summed once at the end ([`super::sum_lanes`]).

use super::{sum_lanes, Acts, WeightRow, BLOCK};

pub fn dot_rows(w: &WeightRow, acts: &Acts, out: &mut [f32]) {
    let kb = w.d.len();
    for (r, o) in out.iter_mut().enumerate().take(acts.m) {
        let mut acc = [0f32; 8];
        for b in 0..kb {
            let wq = &w.qs[b * BLOCK..(b + 1) * BLOCK];
            let xq = &acts.qs[(r * kb + b) * BLOCK..(r * kb + b + 1) * BLOCK];
            let scale = w.d[b] * acts.d[r * kb + b];
            for (lane, a) in acc.iter_mut().enumerate() {
                let i: i32 = (4 * lane..4 * lane + 4)
                    .map(|e| wq[e] as i32 * xq[e] as i32)
                    .sum();
                *a = scale.mul_add(i as f32, *a);
            }
        }
        *o = sum_lanes(acc);
    }
}
