//! A decode step's GPU kernels run on the CPU: `decode_attention.cu` (attention over each
//! row's cache, by length or by a position read on the device, and the cache write),
//! `decode_step.cu` (rotary embedding with the cache write, the residual add with the next RMS
//! norm, SwiGLU from the joint gate/up product) and `lora.cu` (the LoRA delta, per-row or
//! shared adapters). Each runs with its launch code's shape (`cuda_abi::grid`) and
//! arguments (the code it stands for named at each runner) and is compared with the CPU's
//! reference: the CPU kernel or candle op a
//! CPU step runs, and a plain f64 formula.
//!
//! Tolerances: f32 results within 1e-5 relative plus 1e-6 absolute; bf16 results, against the
//! f64 formula on the bf16 inputs, within 1e-2 relative (one to two bf16 ulps, 2^-8..2^-7
//! relative each) plus 1e-4 absolute; the LoRA add, whose results may cancel far below their
//! terms, also 1e-6 times the sum of its terms' absolute values. Every output buffer starts as
//! NaN (0xffff in bf16), so an element the kernel fails to write, or writes where it must not,
//! shows.

use super::*;
use candle_core::{Tensor, D};

use abi::LoraPart;

/// How far a result of `T` may lie from the reference `want` (see the module's doc).
fn tolerance<T: Elem>(want: f64) -> f64 {
    if T::SUFFIX == "bf16" {
        1e-2 * want.abs() + 1e-4
    } else {
        1e-5 * want.abs() + 1e-6
    }
}

/// `got` within [`tolerance`] of `want`: the f64 formula, or an f32 reference (a CPU kernel or
/// candle op).
#[track_caller]
fn assert_near<T: Elem, W: Copy + Into<f64>>(got: &[T], want: &[W], what: &str) {
    assert_close_with(what, got, want, |_, w| tolerance::<T>(w));
}

/// A row's key and value buffers, `kv_heads * cap * d` elements each, head-major
/// (`(1, kv_heads, cap, d)`) or position-major (`(1, cap, kv_heads, d)` seen as
/// `(1, kv_heads, cap, d)`); element `(h, p, i)` lies at `h * stride.0 + p * stride.1 + i`.
struct Cache<T> {
    k: Vec<T>,
    v: Vec<T>,
    k_stride: (usize, usize),
    v_stride: (usize, usize),
    cap: usize,
}

fn strides(position_major: bool, kv_heads: usize, cap: usize, d: usize) -> (usize, usize) {
    if position_major {
        (d, kv_heads * d)
    } else {
        (cap * d, d)
    }
}

impl<T: Elem> Cache<T> {
    /// Positions below `filled` hold values from `seed`; every other element is NaN.
    fn new(
        (kv_heads, cap, d): (usize, usize, usize),
        (k_pm, v_pm): (bool, bool),
        filled: usize,
        seed: u64,
    ) -> Self {
        let n = kv_heads * cap * d;
        let mut c = Cache {
            k: vec![T::UNWRITTEN; n],
            v: vec![T::UNWRITTEN; n],
            k_stride: strides(k_pm, kv_heads, cap, d),
            v_stride: strides(v_pm, kv_heads, cap, d),
            cap,
        };
        let (kx, vx) = (values(n, seed, 1.0), values(n, seed + 1000, 1.0));
        for h in 0..kv_heads {
            for p in 0..filled.min(cap) {
                for i in 0..d {
                    let j = (h * cap + p) * d + i;
                    let (ki, vi) = (c.k_index(h, p, i), c.v_index(h, p, i));
                    c.k[ki] = T::of(kx[j]);
                    c.v[vi] = T::of(vx[j]);
                }
            }
        }
        c
    }

    fn k_index(&self, h: usize, p: usize, i: usize) -> usize {
        h * self.k_stride.0 + p * self.k_stride.1 + i
    }

    fn v_index(&self, h: usize, p: usize, i: usize) -> usize {
        h * self.v_stride.0 + p * self.v_stride.1 + i
    }

    /// The row's table entry (see `decode_attention.cu`): addresses, strides, `len` (a length,
    /// or the capacity with a position address) and the position's address or 0.
    fn entry(&self, len: usize, position: Option<&u32>) -> [i64; 8] {
        [
            self.k.as_ptr() as i64,
            self.v.as_ptr() as i64,
            self.k_stride.0 as i64,
            self.k_stride.1 as i64,
            self.v_stride.0 as i64,
            self.v_stride.1 as i64,
            len as i64,
            position.map_or(0, |p| p as *const u32 as i64),
        ]
    }

    /// The keys or values as a candle view `(1, kv_heads, len, d)` into the whole buffer.
    fn view(&self, values: bool, kv_heads: usize, d: usize, len: usize) -> Tensor {
        let (data, stride) = if values {
            (&self.v, self.v_stride)
        } else {
            (&self.k, self.k_stride)
        };
        let data = to_f32s(data);
        let t = if stride.1 == d {
            tensor(&data, &[1, kv_heads, self.cap, d])
        } else {
            tensor(&data, &[1, self.cap, kv_heads, d])
                .transpose(1, 2)
                .unwrap()
        };
        t.narrow(2, 0, len).unwrap()
    }
}

/// Attention by the formula in f64: query head `h` of row `r` over the first `lens[r]`
/// positions of KV head `h / (heads / kv_heads)`, the query scaled first (as the kernel does).
fn attention_reference<T: Elem>(
    q: &[T],
    caches: &[Cache<T>],
    lens: &[usize],
    (heads, kv_heads, d): (usize, usize, usize),
    scale: f32,
) -> Vec<f64> {
    let group = heads / kv_heads;
    let mut out = Vec::with_capacity(q.len());
    for (r, (c, &len)) in caches.iter().zip(lens).enumerate() {
        for h in 0..heads {
            let kh = h / group;
            let qs: Vec<f64> = (0..d)
                .map(|i| (q[(r * heads + h) * d + i].f32() * scale) as f64)
                .collect();
            let scores: Vec<f64> = (0..len)
                .map(|p| (0..d).map(|i| qs[i] * c.k[c.k_index(kh, p, i)].f64()).sum())
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for i in 0..d {
                let acc: f64 = (0..len)
                    .map(|p| e[p] * c.v[c.v_index(kh, p, i)].f64())
                    .sum();
                out.push(acc / sum);
            }
        }
    }
    out
}

/// As `DecodeAttention::launch` (cuda/decode_attention.rs) launches it: arguments (q, table,
/// out, heads, group, d, scale).
fn launch_attention<T: Elem>(
    q: &[T],
    table: &[i64],
    (heads, group, d): (usize, usize, usize),
    max_len: usize,
    scale: f32,
) -> Vec<T> {
    let lib = library("decode_attention");
    let f = lib.entry::<abi::decode_attention::Kernel, T>();
    let rows = table.len() / 8;
    assert_eq!(q.len(), rows * heads * d);
    let mut out = vec![T::UNWRITTEN; rows * heads * d];
    let (qp, tp, op) = (q.as_ptr(), table.as_ptr(), out.as_mut_ptr());
    let (h32, g32, d32) = (heads as i32, group as i32, d as i32);
    // SAFETY: the table addresses live caches holding every position a row reads (its
    // length, or its position + 1 within its capacity); q and out hold rows * heads * d.
    unsafe {
        lib.launch(grid::decode_attention(heads, rows, d, max_len), || {
            f(qp, tp, op, h32, g32, d32, scale)
        })
    };
    out
}

/// What one attention case ran: the kernel's output, the f64 reference, and its inputs.
struct AttentionCase<T> {
    got: Vec<T>,
    want: Vec<f64>,
    q: Vec<T>,
    caches: Vec<Cache<T>>,
    lens: Vec<usize>,
    shape: (usize, usize, usize),
    scale: f32,
}

impl<T: Elem> AttentionCase<T> {
    /// Runs the kernel for queries `q` over the caches `table` addresses (shared memory sized
    /// for `max_len` scores) and the reference over the caches' first `lens` positions;
    /// `shape` is (heads, KV heads, d).
    fn run(
        q: Vec<T>,
        table: &[i64],
        caches: Vec<Cache<T>>,
        lens: Vec<usize>,
        (heads, kv_heads, d): (usize, usize, usize),
        max_len: usize,
    ) -> Self {
        let scale = 1.0 / (d as f32).sqrt();
        let got = launch_attention(&q, table, (heads, heads / kv_heads, d), max_len, scale);
        let want = attention_reference(&q, &caches, &lens, (heads, kv_heads, d), scale);
        Self {
            got,
            want,
            q,
            caches,
            lens,
            shape: (heads, kv_heads, d),
            scale,
        }
    }
}

/// The "length" form: rows of lengths 37, 150 (over the 128 threads) and 1 as views into
/// roomier buffers whose positions past the length are NaN; heads 6 over 2 KV heads, d 64,
/// the rows' keys and values in different layouts.
fn attention_by_lengths<T: Elem>() -> AttentionCase<T> {
    let (heads, kv_heads, d) = (6, 2, 64);
    let lens = vec![37usize, 150, 1];
    let caps = [48usize, 160, 8];
    let layouts = [(false, false), (true, false), (true, true)];
    let caches: Vec<Cache<T>> = (0..3)
        .map(|r| {
            Cache::new(
                (kv_heads, caps[r], d),
                layouts[r],
                lens[r],
                10 * r as u64 + 1,
            )
        })
        .collect();
    let q = elems::<T>(&values(lens.len() * heads * d, 7, 1.0));
    let table: Vec<i64> = caches
        .iter()
        .zip(&lens)
        .flat_map(|(c, &l)| c.entry(l, None))
        .collect();
    // `attend_rows`: the longest view's length sizes the shared memory.
    let max_len = *lens.iter().max().unwrap();
    AttentionCase::run(q, &table, caches, lens, (heads, kv_heads, d), max_len)
}

/// The "position address" form: whole buffers of capacities 64, 200, 16 and 8, positions 40,
/// 130, 0 and 11 read from host memory through the table (the last past its capacity: the row
/// holds its whole capacity); entries past position + 1 are NaN. Heads 6 over 3 KV heads, d 64.
fn attention_by_positions<T: Elem>() -> AttentionCase<T> {
    let (heads, kv_heads, d) = (6, 3, 64);
    let caps = [64usize, 200, 16, 8];
    let positions = [40u32, 130, 0, 11];
    let lens: Vec<usize> = positions
        .iter()
        .zip(caps)
        .map(|(&p, c)| (p as usize + 1).min(c))
        .collect();
    let layouts = [(true, true), (false, false), (false, true), (true, false)];
    let caches: Vec<Cache<T>> = (0..4)
        .map(|r| {
            Cache::new(
                (kv_heads, caps[r], d),
                layouts[r],
                lens[r],
                10 * r as u64 + 3,
            )
        })
        .collect();
    let q = elems::<T>(&values(caps.len() * heads * d, 9, 1.0));
    let table: Vec<i64> = caches
        .iter()
        .zip(&positions)
        .flat_map(|(c, p)| c.entry(c.cap, Some(p)))
        .collect();
    // `CacheRows::attend`: the largest capacity sizes the shared memory.
    let max_len = *caps.iter().max().unwrap();
    AttentionCase::run(q, &table, caches, lens, (heads, kv_heads, d), max_len)
}

/// The CPU's decode attention (`decode_attention::attend_rows`) over the case's views.
fn attend_rows_on_cpu(case: &AttentionCase<f32>) -> Vec<f32> {
    let (heads, kv_heads, d) = case.shape;
    let rows = case.lens.len();
    let q = tensor(&case.q, &[rows, heads, 1, d]);
    let kv: Vec<(Tensor, Tensor)> = case
        .caches
        .iter()
        .zip(&case.lens)
        .map(|(c, &l)| (c.view(false, kv_heads, d, l), c.view(true, kv_heads, d, l)))
        .collect();
    flat(&crate::model::kernels::decode_attention::attend_rows(&q, &kv, case.scale as f64).unwrap())
}

#[test]
fn decode_attention_f32_by_lengths_matches_the_cpu_kernel() {
    let case = attention_by_lengths::<f32>();
    assert_near(&case.got, &case.want, "f32 by lengths vs f64");
    assert_near(
        &case.got,
        &attend_rows_on_cpu(&case),
        "f32 by lengths vs attend_rows",
    );
}

#[test]
fn decode_attention_f32_by_positions_reads_only_up_to_each_position() {
    let case = attention_by_positions::<f32>();
    assert_near(&case.got, &case.want, "f32 by positions vs f64");
    assert_near(
        &case.got,
        &attend_rows_on_cpu(&case),
        "f32 by positions vs attend_rows",
    );
}

#[test]
fn decode_attention_bf16_by_lengths_matches_the_formula() {
    let case = attention_by_lengths::<u16>();
    assert_near(&case.got, &case.want, "bf16 by lengths");
}

#[test]
fn decode_attention_bf16_by_positions_reads_only_up_to_each_position() {
    let case = attention_by_positions::<u16>();
    assert_near(&case.got, &case.want, "bf16 by positions");
}

/// Rows' positions and capacities for the cache writes: within, at the last slot, at the
/// capacity and past it (the last two write nothing).
const WRITE_CAPS: [usize; 4] = [12, 9, 6, 4];
const WRITE_POSITIONS: [u32; 4] = [5, 8, 6, 11];

/// Checks that row `r`'s cache holds `want(h, i)` (key, value bits) at its position, if
/// within its capacity, and NaN everywhere else.
#[track_caller]
fn assert_written_at_position_only<T: Elem>(
    c: &Cache<T>,
    (kv_heads, d): (usize, usize),
    position: u32,
    r: usize,
    mut check: impl FnMut(usize, usize, T, T),
) {
    let mut written = 0;
    for h in 0..kv_heads {
        for p in 0..c.cap {
            for i in 0..d {
                let (k, v) = (c.k[c.k_index(h, p, i)], c.v[c.v_index(h, p, i)]);
                if p == position as usize {
                    check(h, i, k, v);
                    written += 1;
                } else {
                    assert_eq!(
                        (k.bits(), v.bits()),
                        (T::UNWRITTEN.bits(), T::UNWRITTEN.bits()),
                        "row {r} wrote head {h} position {p} element {i}, not its position"
                    );
                }
            }
        }
    }
    let within = (position as usize) < c.cap;
    assert_eq!(written, if within { kv_heads * d } else { 0 }, "row {r}");
}

/// As `write_rows` (cuda/decode_attention.rs) launches it: arguments (src_k, src_v, table,
/// kv_heads, d). d 136 (over the block).
fn kv_write_case<T: Elem>() {
    let (kv_heads, d) = (2, 136);
    let rows = WRITE_CAPS.len();
    let layouts = [(false, false), (true, true), (false, true), (true, false)];
    let caches: Vec<Cache<T>> = (0..rows)
        .map(|r| Cache::new((kv_heads, WRITE_CAPS[r], d), layouts[r], 0, 0))
        .collect();
    let positions = WRITE_POSITIONS;
    let table: Vec<i64> = caches
        .iter()
        .zip(&positions)
        .flat_map(|(c, p)| c.entry(c.cap, Some(p)))
        .collect();
    let src_k = elems::<T>(&values(rows * kv_heads * d, 21, 1.0));
    let src_v = elems::<T>(&values(rows * kv_heads * d, 22, 1.0));
    let lib = library("decode_attention");
    let f = lib.entry::<abi::kv_write::Kernel, T>();
    let (kp, vp, tp) = (src_k.as_ptr(), src_v.as_ptr(), table.as_ptr());
    let (h32, d32) = (kv_heads as i32, d as i32);
    // SAFETY: the table addresses the caches above (alive to the end), each of its capacity;
    // the sources hold rows * kv_heads * d elements.
    unsafe { lib.launch(grid::kv_write(kv_heads, rows), || f(kp, vp, tp, h32, d32)) };
    for (r, c) in caches.iter().enumerate() {
        assert_written_at_position_only(c, (kv_heads, d), positions[r], r, |h, i, k, v| {
            let s = (r * kv_heads + h) * d + i;
            assert_eq!(
                (k.bits(), v.bits()),
                (src_k[s].bits(), src_v[s].bits()),
                "row {r} head {h} element {i}"
            );
        });
    }
}

#[test]
fn kv_write_f32_writes_each_row_at_its_position_within_capacity() {
    kv_write_case::<f32>();
}

#[test]
fn kv_write_bf16_writes_each_row_at_its_position_within_capacity() {
    kv_write_case::<u16>();
}

/// What a rotary case returns for an extra f32 comparison: q_out, the joint qkv product, the
/// angles, the caches and the shape (heads, kv_heads, d, row width).
struct RopeCase<T> {
    q_out: Vec<T>,
    qkv: Vec<T>,
    cos: Vec<T>,
    sin: Vec<T>,
    caches: Vec<Cache<T>>,
    shape: (usize, usize, usize, usize),
}

/// `(x[i] c - x[i + half] s, x[i + half] c + x[i] s)`, in f64, of `d` elements at `x`.
fn rotate(x: &[f64], c: &[f64], s: &[f64]) -> Vec<f64> {
    let half = c.len();
    let mut y = vec![0.0; 2 * half];
    for i in 0..half {
        y[i] = x[i] * c[i] - x[i + half] * s[i];
        y[i + half] = x[i + half] * c[i] + x[i] * s[i];
    }
    y
}

/// As `RopeCacheWrite::launch` (cuda/decode_step.rs) launches it: arguments (q, k, v, q_rs,
/// k_rs, v_rs, cos, sin, table, q_out, heads, d, x, in, and no LoRA deltas). q, k and v are the parts of one joint `(rows, 1, (heads + 2 kv) d)`
/// product (row strides its width); heads 4 over 2 KV heads; rows at the positions of the cache
/// writes above (two of them at or past their capacity: no write, but q is rotated).
fn rope_cache_write_case<T: Elem>(d: usize) -> RopeCase<T> {
    let (heads, kv_heads) = (4, 2);
    let rows = WRITE_CAPS.len();
    let width = (heads + 2 * kv_heads) * d;
    let half = d / 2;
    let qkv = elems::<T>(&values(rows * width, 31, 1.0));
    let positions = WRITE_POSITIONS;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in &positions {
        for i in 0..half {
            let a = p as f32 * 10000f32.powf(-2.0 * i as f32 / d as f32);
            cos.push(T::of(a.cos()));
            sin.push(T::of(a.sin()));
        }
    }
    let layouts = [(true, false), (false, false), (true, true), (false, true)];
    let caches: Vec<Cache<T>> = (0..rows)
        .map(|r| Cache::new((kv_heads, WRITE_CAPS[r], d), layouts[r], 0, 0))
        .collect();
    let table: Vec<i64> = caches
        .iter()
        .zip(&positions)
        .flat_map(|(c, p)| c.entry(c.cap, Some(p)))
        .collect();
    let mut q_out = vec![T::UNWRITTEN; rows * heads * d];
    let lib = library("decode_step");
    let f = lib.entry::<abi::rope_cache_write::Kernel, T>();
    let base = qkv.as_ptr();
    // SAFETY: the parts' offsets lie within the joint product's first row.
    let (qp, kp, vp) = unsafe { (base, base.add(heads * d), base.add((heads + kv_heads) * d)) };
    let rs = width as i64;
    let (cp, sp, tp, op) = (
        cos.as_ptr(),
        sin.as_ptr(),
        table.as_ptr(),
        q_out.as_mut_ptr(),
    );
    let (h32, d32) = (heads as i32, d as i32);
    // SAFETY: rows of `width` elements hold every part read at the row stride; the angles
    // hold rows * d / 2, q_out rows * heads * d; the table addresses the caches above.
    unsafe {
        lib.launch(grid::rope_cache_write(heads, kv_heads, rows), || {
            f(
                qp,
                kp,
                vp,
                rs,
                rs,
                rs,
                cp,
                sp,
                tp,
                op,
                h32,
                d32,
                std::ptr::null(),
                0,
                LoraPart::default(),
                LoraPart::default(),
                LoraPart::default(),
            )
        })
    };
    // The f64 formula on the kernel's inputs.
    let at = |r: usize, off: usize| -> Vec<f64> {
        (0..d).map(|i| qkv[r * width + off + i].f64()).collect()
    };
    let mut want_q = Vec::new();
    for r in 0..rows {
        let c: Vec<f64> = cos[r * half..(r + 1) * half]
            .iter()
            .map(|x| x.f64())
            .collect();
        let s: Vec<f64> = sin[r * half..(r + 1) * half]
            .iter()
            .map(|x| x.f64())
            .collect();
        for h in 0..heads {
            want_q.extend(rotate(&at(r, h * d), &c, &s));
        }
        let want_k: Vec<Vec<f64>> = (0..kv_heads)
            .map(|h| rotate(&at(r, (heads + h) * d), &c, &s))
            .collect();
        assert_written_at_position_only(
            &caches[r],
            (kv_heads, d),
            positions[r],
            r,
            |h, i, k, v| {
                let w = want_k[h][i];
                assert!(
                    (k.f64() - w).abs() <= tolerance::<T>(w),
                    "row {r} key head {h} element {i}: kernel {}, reference {w}",
                    k.f64()
                );
                let src = qkv[r * width + (heads + kv_heads + h) * d + i];
                assert_eq!(v.bits(), src.bits(), "row {r} value head {h} element {i}");
            },
        );
    }
    assert_near(&q_out, &want_q, "rotated q");
    RopeCase {
        q_out,
        qkv,
        cos,
        sin,
        caches,
        shape: (heads, kv_heads, d, width),
    }
}

#[test]
fn rope_cache_write_f32_matches_candle_rope_and_writes_at_positions() {
    let case = rope_cache_write_case::<f32>(64);
    let (heads, kv_heads, d, width) = case.shape;
    let rows = WRITE_CAPS.len();
    // What the CPU step runs: the parts split to (rows, heads, 1, d), candle's rope.
    let joint = tensor(&case.qkv, &[rows, 1, width]);
    let cos = tensor(&case.cos, &[rows, 1, d / 2]);
    let sin = tensor(&case.sin, &[rows, 1, d / 2]);
    let rope = |start: usize, n: usize| -> Vec<f32> {
        let x = joint
            .narrow(2, start * d, n * d)
            .unwrap()
            .reshape((rows, 1, n, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        flat(&candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap())
    };
    assert_near(&case.q_out, &rope(0, heads), "q vs candle rope");
    let k = rope(heads, kv_heads);
    for (r, c) in case.caches.iter().enumerate() {
        let p = WRITE_POSITIONS[r] as usize;
        if p >= c.cap {
            continue;
        }
        let got: Vec<f32> = (0..kv_heads)
            .flat_map(|h| (0..d).map(move |i| (h, i)))
            .map(|(h, i)| c.k[c.k_index(h, p, i)])
            .collect();
        let want = &k[r * kv_heads * d..(r + 1) * kv_heads * d];
        assert_near(&got, want, &format!("row {r} cached key vs candle rope"));
    }
}

#[test]
fn rope_cache_write_bf16_with_half_over_the_block_matches_the_formula() {
    // d 288: 144 rotated pairs, more than the block's 128 threads.
    let case = rope_cache_write_case::<u16>(288);
    assert_eq!(case.q_out.len(), WRITE_CAPS.len() * case.shape.0 * 288);
}

/// One rotary cache write of `rows` rows (heads 4 over 2 KV heads, d 64, input 96) at
/// `WRITE_POSITIONS`, from the joint product `qkv` (`(rows, width)`), with `deltas` for q, k
/// and v added in the launch, or none: the rotated q and the caches.
fn rope_write_run<T: Elem>(
    qkv: &[T],
    row_stride: [i64; 3],
    parts: [*const T; 3],
    x: &[T],
    deltas: [LoraPart; 3],
    angles: (&[T], &[T]),
) -> (Vec<T>, Vec<Cache<T>>) {
    let (heads, kv_heads, d) = (4usize, 2usize, 64usize);
    let rows = WRITE_CAPS.len();
    let layouts = [(true, false), (false, false), (true, true), (false, true)];
    let caches: Vec<Cache<T>> = (0..rows)
        .map(|r| Cache::new((kv_heads, WRITE_CAPS[r], d), layouts[r], 0, 0))
        .collect();
    let positions = WRITE_POSITIONS;
    let table: Vec<i64> = caches
        .iter()
        .zip(&positions)
        .flat_map(|(c, p)| c.entry(c.cap, Some(p)))
        .collect();
    let mut q_out = vec![T::UNWRITTEN; rows * heads * d];
    let lib = library("decode_step");
    let f = lib.entry::<abi::rope_cache_write::Kernel, T>();
    let (cp, sp, tp, op, xp) = (
        angles.0.as_ptr(),
        angles.1.as_ptr(),
        table.as_ptr(),
        q_out.as_mut_ptr(),
        x.as_ptr(),
    );
    let inp = (x.len() / rows) as i32;
    let _ = qkv;
    // SAFETY: each part's rows hold its heads at its row stride; x holds rows * in; the
    // deltas' factors are what `deltas` addresses; the table addresses the caches above.
    unsafe {
        lib.launch(grid::rope_cache_write(heads, kv_heads, rows), || {
            f(
                parts[0],
                parts[1],
                parts[2],
                row_stride[0],
                row_stride[1],
                row_stride[2],
                cp,
                sp,
                tp,
                op,
                heads as i32,
                d as i32,
                xp,
                inp,
                deltas[0],
                deltas[1],
                deltas[2],
            )
        })
    };
    (q_out, caches)
}

/// The deltas added inside the rotary cache write give the bits of the two launches they
/// replace: `lora.cu`'s add on the q and v parts (per-row adapters, one row scaled 0) and on
/// k (one adapter for every row), then the write on what the adds stored.
fn rope_write_with_deltas_case<T: Elem>() {
    let (heads, kv_heads, d, inp, rank) = (4usize, 2usize, 64usize, 96usize, 5usize);
    let rows = WRITE_CAPS.len();
    let (qw, kw) = (heads * d, kv_heads * d);
    let width = qw + 2 * kw;
    let qkv = elems::<T>(&values(rows * width, 71, 1.0));
    let x = elems::<T>(&values(rows * inp, 72, 1.0));
    // q, v: a pair per row; k: one pair for every row.
    let qa = elems::<T>(&values(rows * rank * inp, 73, 0.3));
    let qb = elems::<T>(&values(rows * qw * rank, 74, 0.3));
    let va = elems::<T>(&values(rows * rank * inp, 75, 0.3));
    let vb = elems::<T>(&values(rows * kw * rank, 76, 0.3));
    let ka = elems::<T>(&values(rank * inp, 77, 0.3));
    let kb = elems::<T>(&values(kw * rank, 78, 0.3));
    let scales = [0.5f32, 0.0, 2.0, 1.25];
    let half = d / 2;
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for &p in &WRITE_POSITIONS {
        for i in 0..half {
            let a = p as f32 * 10000f32.powf(-2.0 * i as f32 / d as f32);
            cos.push(T::of(a.cos()));
            sin.push(T::of(a.sin()));
        }
    }
    let part = |a: &[T], b: &[T], per_row: bool, scale: f32| LoraPart {
        a: a.as_ptr() as u64,
        b: b.as_ptr() as u64,
        scales: if per_row { scales.as_ptr() as u64 } else { 0 },
        a_stride: if per_row { (rank * inp) as i64 } else { 0 },
        b_stride: if per_row { (b.len() / rows) as i64 } else { 0 },
        scale,
        rank: rank as i32,
    };
    // Fused: the raw joint product, the deltas added in the write.
    let base = qkv.as_ptr();
    // SAFETY: the parts' offsets lie within the joint product's first row.
    let raw = unsafe { [base, base.add(qw), base.add(qw + kw)] };
    let deltas = [
        part(&qa, &qb, true, 0.0),
        part(&ka, &kb, false, 0.75),
        part(&va, &vb, true, 0.0),
    ];
    let w = width as i64;
    let (fq, fc) = rope_write_run(&qkv, [w; 3], raw, &x, deltas, (&cos, &sin));
    // Unfused: each part's LoRA add (`LoraAdd::launch`), then the write without deltas.
    let lora = library("lora");
    let add = lora.entry::<abi::lora_add::Kernel, T>();
    let added = |offset: usize, outs: usize, p: &LoraPart| -> Vec<T> {
        let mut out = vec![T::UNWRITTEN; rows * outs];
        let (op, xp) = (out.as_mut_ptr(), x.as_ptr());
        // SAFETY: y is the part at `offset` of each joint row (row stride `width`), x rows *
        // in, the factors and scales as `p` addresses, out rows * outs.
        unsafe {
            let y = base.add(offset);
            lora.launch(grid::lora_add(rows), || {
                add(
                    y,
                    xp,
                    p.a as *const T,
                    p.b as *const T,
                    p.scales as *const f32,
                    p.scale,
                    op,
                    inp as i32,
                    outs as i32,
                    rank as i32,
                    p.a_stride,
                    p.b_stride,
                    width as i64,
                )
            })
        };
        out
    };
    let (q2, k2, v2) = (
        added(0, qw, &deltas[0]),
        added(qw, kw, &deltas[1]),
        added(qw + kw, kw, &deltas[2]),
    );
    let parts = [q2.as_ptr(), k2.as_ptr(), v2.as_ptr()];
    let strides = [qw as i64, kw as i64, kw as i64];
    let none = [LoraPart::default(); 3];
    let (uq, uc) = rope_write_run(&qkv, strides, parts, &x, none, (&cos, &sin));
    let bits = |v: &[T]| v.iter().map(|x| x.bits()).collect::<Vec<_>>();
    assert_eq!(bits(&fq), bits(&uq), "rotated q, {}", T::SUFFIX);
    for (r, (f, u)) in fc.iter().zip(&uc).enumerate() {
        assert_eq!(bits(&f.k), bits(&u.k), "row {r} keys, {}", T::SUFFIX);
        assert_eq!(bits(&f.v), bits(&u.v), "row {r} values, {}", T::SUFFIX);
    }
    // The deltas did change what was written (row 1's q and v are scaled 0, k is not).
    assert_ne!(
        bits(&fq),
        bits(&rope_write_run(&qkv, [w; 3], raw, &x, none, (&cos, &sin)).0)
    );
    let _ = kv_heads;
}

#[test]
fn rope_cache_write_adds_lora_deltas_with_the_bits_of_the_lora_add() {
    rope_write_with_deltas_case::<f32>();
    rope_write_with_deltas_case::<u16>();
}

/// As `AddRmsNorm::launch` (cuda/decode_step.rs) launches it: arguments (x, a, w, out, rows
/// as i64, n, eps). Returns x, a, w and out
/// (`2 * rows * n`: the sums, then the norms), having checked out against the f64 formula.
fn add_rms_norm_case<T: Elem>(rows: usize, n: usize, eps: f32) -> [Vec<T>; 4] {
    let x = elems::<T>(&values(rows * n, 41, 1.0));
    let a = elems::<T>(&values(rows * n, 42, 1.0));
    let w: Vec<T> = values(n, 43, 1.0)
        .into_iter()
        .map(|v| T::of(1.0 + 0.5 * v))
        .collect();
    let mut out = vec![T::UNWRITTEN; 2 * rows * n];
    let lib = library("decode_step");
    let f = lib.entry::<abi::add_rms_norm::Kernel, T>();
    let (xp, ap, wp, op) = (x.as_ptr(), a.as_ptr(), w.as_ptr(), out.as_mut_ptr());
    let (rows64, n32) = (rows as i64, n as i32);
    // SAFETY: x and a hold rows * n, w n, out 2 * rows * n elements.
    unsafe {
        lib.launch(grid::add_rms_norm(rows), || {
            f(xp, ap, wp, op, rows64, n32, eps)
        })
    };
    // The sum: the f32 add rounded to T once, bit for bit.
    for (i, ((o, x), a)) in out.iter().zip(&x).zip(&a).enumerate() {
        let want = T::of(x.f32() + a.f32());
        assert_eq!(o.bits(), want.bits(), "x + a [{i}]");
    }
    // The norm, from the stored sum (as the kernel documents), in f64.
    let mut want = Vec::with_capacity(rows * n);
    for s in out[..rows * n].chunks(n) {
        let ms = s.iter().map(|v| v.f64() * v.f64()).sum::<f64>() / n as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        want.extend(s.iter().zip(&w).map(|(v, w)| v.f64() * inv * w.f64()));
    }
    assert_near(&out[rows * n..], &want, "rms norm");
    [x, a, w, out]
}

#[test]
fn add_rms_norm_f32_matches_candle_add_and_rms_norm() {
    let (rows, n, eps) = (3, 300, 1e-6f32);
    let [x, a, w, out] = add_rms_norm_case::<f32>(rows, n, eps);
    // What the CPU step runs: the add, then candle's rms_norm.
    let x = tensor(&x, &[rows, 1, n]);
    let a = tensor(&a, &[rows, 1, n]);
    let w = tensor(&w, &[n]);
    let sum = (x + a).unwrap();
    let norm = candle_nn::ops::rms_norm(&sum, &w, eps).unwrap();
    assert_near(&out[..rows * n], &flat(&sum), "x + a vs candle");
    assert_near(&out[rows * n..], &flat(&norm), "norm vs candle rms_norm");
}

#[test]
fn add_rms_norm_bf16_matches_the_formula_on_the_stored_sum() {
    let out = &add_rms_norm_case::<u16>(3, 520, 1e-5)[3];
    assert_eq!(out.len(), 2 * 3 * 520);
}

/// As `SwigluJoint::launch` (cuda/decode_step.rs) launches it: arguments (gu, out, rows as
/// i64, n). Returns gu and out, having checked out against the f64 formula.
fn swiglu_case<T: Elem>(rows: usize, n: usize) -> (Vec<T>, Vec<T>) {
    let gu: Vec<T> = elems(&values(rows * 2 * n, 51, 4.0));
    let len = rows * n;
    let mut out = vec![T::UNWRITTEN; len];
    let lib = library("decode_step");
    let f = lib.entry::<abi::swiglu_joint::Kernel, T>();
    let (gp, op) = (gu.as_ptr(), out.as_mut_ptr());
    let (rows64, n32) = (rows as i64, n as i32);
    // SAFETY: gu holds rows * 2n elements, out rows * n.
    unsafe { lib.launch(grid::swiglu_joint(len), || f(gp, op, rows64, n32)) };
    let want: Vec<f64> = gu
        .chunks(2 * n)
        .flat_map(|row| {
            (0..n).map(move |j| {
                let (g, u) = (row[j].f64(), row[n + j].f64());
                g / (1.0 + (-g).exp()) * u
            })
        })
        .collect();
    assert_near(&out, &want, "swiglu");
    (gu, out)
}

#[test]
fn swiglu_joint_f32_matches_candle_silu_times_up() {
    let (rows, n) = (3, 700); // 2100 outputs: 17 blocks, the last one partly idle
    let (gu, out) = swiglu_case::<f32>(rows, n);
    let gu = tensor(&gu, &[rows, 1, 2 * n]);
    let g = gu.narrow(D::Minus1, 0, n).unwrap();
    let u = gu.narrow(D::Minus1, n, n).unwrap();
    let want = flat(&(candle_nn::ops::silu(&g).unwrap() * u).unwrap());
    assert_near(&out, &want, "swiglu vs candle");
}

#[test]
fn swiglu_joint_bf16_matches_the_formula() {
    let (_, out) = swiglu_case::<u16>(2, 450);
    assert_eq!(out.len(), 900);
}

/// A LoRA case: rows, in, outs, rank; per-row adapters and scales (or one shared adapter and
/// `scale`); y a part of a joint product `(rows, y_width)` at column `y_offset`.
struct Lora {
    rows: usize,
    inp: usize,
    outs: usize,
    rank: usize,
    per_row: bool,
    y_width: usize,
    y_offset: usize,
}

/// As `LoraAdd::launch` (cuda/lora.rs) launches it: arguments (y, x, a, b, scales or null,
/// scale, out, in, outs, rank, a_stride, b_stride, y_stride), strides (rank * in, outs * rank) per row or (0, 0) shared (`add`).
/// Checks out against `y + s B (A x)` in f64.
fn lora_case<T: Elem>(c: &Lora) {
    let Lora {
        rows,
        inp,
        outs,
        rank,
        per_row,
        y_width,
        y_offset,
    } = *c;
    assert!(y_offset + outs <= y_width);
    let adapters = if per_row { rows } else { 1 };
    let x = elems::<T>(&values(rows * inp, 61, 1.0));
    let a = elems::<T>(&values(adapters * rank * inp, 62, 1.0));
    let b = elems::<T>(&values(adapters * outs * rank, 63, 1.0));
    let joint = elems::<T>(&values(rows * y_width, 64, 1.0));
    let scales = [0.5f32, -1.25, 2.0, 0.125, 3.0, -0.75];
    // Per-row scales for at most six rows; a shared adapter reads none.
    let scales = &scales[..if per_row { rows } else { 0 }];
    // With per-row scales the shared scale must go unread: a value no row uses.
    let scale = if per_row { 99.0f32 } else { 0.75 };
    let (a_stride, b_stride) = if per_row {
        ((rank * inp) as i64, (outs * rank) as i64)
    } else {
        (0, 0)
    };
    let mut out = vec![T::UNWRITTEN; rows * outs];
    let lib = library("lora");
    let f = lib.entry::<abi::lora_add::Kernel, T>();
    // SAFETY: the offset lies within the joint product's first row.
    let yp = unsafe { joint.as_ptr().add(y_offset) };
    let (xp, ap, bp, op) = (x.as_ptr(), a.as_ptr(), b.as_ptr(), out.as_mut_ptr());
    let sp = if per_row {
        scales.as_ptr()
    } else {
        std::ptr::null()
    };
    let (in32, out32, r32, ys) = (inp as i32, outs as i32, rank as i32, y_width as i64);
    // SAFETY: x holds rows * in, a and b one factor pair per adapter at the strides, the
    // joint product rows of y_width, scales one per row; out holds rows * outs.
    unsafe {
        lib.launch(grid::lora_add(rows), || {
            f(
                yp, xp, ap, bp, sp, scale, op, in32, out32, r32, a_stride, b_stride, ys,
            )
        })
    };
    // The formula, and each result's magnitude: the sum of its terms' absolute values, which
    // bounds the f32 sums' rounding (a result may cancel to far below its terms).
    let (mut want, mut magnitude) = (Vec::new(), Vec::new());
    for r in 0..rows {
        let ad = if per_row { r } else { 0 };
        let s = if per_row { scales[r] } else { scale } as f64;
        let (a, x) = (&a, &x);
        let terms = |k: usize| {
            (0..inp).map(move |i| a[(ad * rank + k) * inp + i].f64() * x[r * inp + i].f64())
        };
        let h: Vec<f64> = (0..rank).map(|k| terms(k).sum()).collect();
        let h_abs: Vec<f64> = (0..rank).map(|k| terms(k).map(f64::abs).sum()).collect();
        for j in 0..outs {
            let bj = &b[(ad * outs + j) * rank..(ad * outs + j + 1) * rank];
            let delta: f64 = bj.iter().zip(&h).map(|(b, h)| b.f64() * h).sum();
            let delta_abs: f64 = bj
                .iter()
                .zip(&h_abs)
                .map(|(b, h)| (b.f64() * h).abs())
                .sum();
            let y = joint[r * y_width + y_offset + j].f64();
            want.push(y + s * delta);
            magnitude.push(y.abs() + s.abs() * delta_abs);
        }
    }
    // Room for f32 sums' rounding: `1e-6 * magnitude` more (a result may cancel to far below
    // its terms; 1e-6 is about 17 f32 half-ulps, far under the worst case of a few hundred
    // additions and some 400 times what the kernel's sums were seen to need).
    assert_close_with("lora add", &out, &want, |i, w| {
        tolerance::<T>(w) + 1e-6 * magnitude[i]
    });
}

#[test]
fn lora_add_f32_per_row_adapters_on_a_part_of_a_joint_product() {
    // Rank 11 over the block's 8 warps, outs 300 over its 256 threads; y the middle part.
    lora_case::<f32>(&Lora {
        rows: 3,
        inp: 200,
        outs: 300,
        rank: 11,
        per_row: true,
        y_width: 428,
        y_offset: 64,
    });
}

#[test]
fn lora_add_f32_shared_adapter() {
    lora_case::<f32>(&Lora {
        rows: 4,
        inp: 130,
        outs: 70,
        rank: 4,
        per_row: false,
        y_width: 70,
        y_offset: 0,
    });
}

/// A prefill chunk's positions (or a loss pass's rows) with one adapter: a block per row,
/// as many as the rows.
#[test]
fn lora_add_f32_many_positions_one_adapter() {
    lora_case::<f32>(&Lora {
        rows: 150,
        inp: 96,
        outs: 48,
        rank: 8,
        per_row: false,
        y_width: 96,
        y_offset: 48,
    });
}

#[test]
fn lora_add_bf16_per_row_and_shared_adapters_on_joint_parts() {
    lora_case::<u16>(&Lora {
        rows: 3,
        inp: 96,
        outs: 280,
        rank: 9,
        per_row: true,
        y_width: 360,
        y_offset: 80,
    });
    lora_case::<u16>(&Lora {
        rows: 2,
        inp: 150,
        outs: 40,
        rank: 16,
        per_row: false,
        y_width: 120,
        y_offset: 40,
    });
}

/// The block sizes the launch code launches with are the kernels' own.
#[test]
fn launch_block_sizes_are_the_kernels() {
    assert_define(
        "decode_attention",
        "THREADS",
        grid::DECODE_ATTENTION_THREADS,
    );
    assert_define("decode_step", "THREADS", grid::DECODE_STEP_THREADS);
    assert_define("decode_step", "NORM_THREADS", grid::NORM_THREADS);
    assert_define("lora", "THREADS", grid::LORA_THREADS);
    assert_define("lora_training", "THREADS", grid::LORA_THREADS);
    assert_define("greedy", "THREADS", grid::GREEDY_THREADS);
    assert_define("training_ops", "THREADS", grid::OPS_THREADS);
    assert_define("training_attention", "WARPS", grid::ATTN_WARPS);
    assert_define("optimizer", "THREADS", grid::OPTIMIZER_THREADS);
    assert_define("optimizer", "CHUNK", grid::OPTIMIZER_CHUNK);
    for file in ["lora", "lora_training", "decode_step"] {
        assert_define(file, "MAX_RANK", crate::model::fused::LORA_MAX_RANK);
    }
}

// ---------------------------------------------------------------------------------------
// greedy.cu, launched as cuda/greedy.rs launches it: one block per row.

/// Runs `greedy_pick` over `rows` rows of `vocab` logits: (token, log-probability) per row.
fn greedy_on_cpu<T: Elem>(logits: &[T], vocab: usize) -> Vec<(f64, f64)> {
    let rows = logits.len() / vocab;
    let lib = library("greedy");
    let f = lib.entry::<abi::greedy_pick::Kernel, T>();
    let mut out = vec![f64::NAN; 2 * rows];
    let (lp, op) = (logits.as_ptr(), out.as_mut_ptr());
    // SAFETY: block r reads row r of `rows * vocab` logits and writes out[2r..2r + 2].
    unsafe { lib.launch(grid::greedy_pick(rows), || f(lp, vocab as i64, op)) };
    out.chunks_exact(2).map(|p| (p[0], p[1])).collect()
}

/// The kernel picks what the CPU body picks (the first of equal maxima, never a NaN) and its
/// log-probability to within f64 rounding of another summation order, for a vocabulary of the
/// default model's size, one not a multiple of the block, and bf16 logits.
fn greedy_case<T: Elem>(vocab: usize) {
    let rows = 4;
    let mut v = values(rows * vocab, vocab as u64, 12.0);
    // Row 1: equal maxima far apart (the first wins); row 2: a NaN and the maximum after it;
    // row 3: every logit equal.
    v[vocab + 7] = 40.0;
    v[2 * vocab - 3] = 40.0;
    v[2 * vocab + 5] = f32::NAN;
    v[2 * vocab + 6] = 39.0;
    v[3 * vocab..].fill(0.5);
    let logits = elems::<T>(&v);
    let got = greedy_on_cpu(&logits, vocab);
    let host = to_f32s(&logits);
    for (r, &(token, logprob)) in got.iter().enumerate() {
        let row = &host[r * vocab..(r + 1) * vocab];
        let want = (0..vocab)
            .filter(|&i| !row[i].is_nan())
            .fold(None::<usize>, |b, i| match b {
                Some(j) if row[j] >= row[i] => Some(j),
                _ => Some(i),
            })
            .unwrap();
        assert_eq!(token, want as f64, "row {r}: token");
        // The log-probability over the row's finite logits (row 2's NaN aside).
        let top = row[want] as f64;
        let sum: f64 = row
            .iter()
            .filter(|x| !x.is_nan())
            .map(|&x| (x as f64 - top).exp())
            .sum();
        let lp = -sum.ln();
        if r == 2 {
            assert!(logprob.is_nan(), "row 2 holds a NaN: its sum is NaN");
        } else {
            assert!(
                (logprob - lp).abs() <= 1e-12 * lp.abs().max(1.0),
                "row {r}: {logprob} vs {lp}"
            );
        }
    }
    assert_eq!(got[1].0, 7.0);
    assert_eq!(got[3].0, 0.0);
    assert!((got[3].1 + (vocab as f64).ln()).abs() < 1e-9);
    // The rows without a NaN as the CPU body picks them (`greedy_picks` on the CPU).
    let t = tensor(&host, &[rows, vocab]);
    let cpu = crate::model::greedy_picks(&t, true).unwrap();
    for r in [0, 1, 3] {
        assert_eq!(
            cpu[r].token as f64, got[r].0,
            "row {r}: the CPU body's token"
        );
        let tol = 1e-12 * cpu[r].logprob.abs().max(1.0);
        assert!((cpu[r].logprob - got[r].1).abs() <= tol, "row {r}");
    }
}

#[test]
fn greedy_pick_f32_matches_the_cpu_body_for_the_default_vocabulary() {
    greedy_case::<f32>(49_152);
}

#[test]
fn greedy_pick_f32_and_bf16_match_for_a_vocabulary_off_the_block() {
    greedy_case::<f32>(1_000 + 7);
    greedy_case::<u16>(1_000 + 7);
}

/// As `cuda::lora::copy_into` launches it: a table of (source, destination, bytes) spans, one
/// block each. Spans of f32 and of bf16 bits, one longer than the block's threads, one empty,
/// written into places of larger buffers: each span lands where it says and nothing else moves.
#[test]
fn lora_restack_copies_each_span_into_its_place_and_nothing_else() {
    let src_f: Vec<f32> = values(700, 3, 1.0);
    let src_h: Vec<u16> = (0..300u16).map(|i| i.wrapping_mul(2654) | 1).collect();
    let mut dst_f = vec![f32::NAN; 1000];
    let mut dst_h = vec![0u16; 400];
    let (sf, sh) = (src_f.as_ptr() as i64, src_h.as_ptr() as i64);
    let (df, dh) = (dst_f.as_mut_ptr() as i64, dst_h.as_mut_ptr() as i64);
    // (source, destination, bytes): 600 floats at element 100, the first 300 bf16 at 50, the
    // last 100 floats at 0, and an empty span.
    let spans: Vec<i64> = vec![
        sf,
        df + 4 * 100,
        4 * 600,
        sh,
        dh + 2 * 50,
        2 * 300,
        sf + 4 * 600,
        df,
        4 * 100,
        sf,
        df + 4 * 999,
        0,
    ];
    let lib = library("lora");
    let f = lib.entry::<abi::lora_restack::Kernel, f32>();
    let (tp, n) = (spans.as_ptr(), (spans.len() / 3) as i32);
    // SAFETY: every span's source and destination lie within the vectors above (alive to the
    // end), which nothing else touches while the kernel runs.
    unsafe { lib.launch(grid::lora_restack(n as usize), || f(tp, n)) };
    assert_eq!(&dst_f[100..700], &src_f[..600]);
    assert_eq!(&dst_f[..100], &src_f[600..700]);
    assert!(dst_f[700..].iter().all(|v| v.is_nan()), "past the spans");
    assert_eq!(&dst_h[50..350], &src_h[..]);
    assert!(dst_h[..50].iter().chain(&dst_h[350..]).all(|&v| v == 0));
}
