//! Adaptation's GPU kernels (`training_ops.cu`, `training_attention.cu`) run on the CPU through
//! the grids, blocks, shared memory and arguments of their launch code
//! (`cuda/training_ops.rs`, `cuda/training_attention.rs`), against the CPU bodies of the same
//! ops in `fused/` (values, and gradients through candle's autograd). Every output buffer
//! starts as NaN (f32) or 0xffff (a bf16 NaN), so an element a kernel leaves unwritten fails.
//! bf16 kernels are compared with the f32 reference on the bf16-rounded operands.

use candle_core::{Result, Tensor, Var};

use super::*;
use crate::model::kernels::fused;

/// f32 outputs (the f32 kernels, and the bf16 norm's f32 gradients): the reference's f32
/// arithmetic summed in another order, within 1e-5 relative plus 1e-6 (the kernels' worst is
/// about a quarter of that, attention's gradients included).
const F32_REL: f64 = 1e-5;
const F32_ABS: f64 = 1e-6;
/// bf16 outputs: the store's rounding (half a bf16 ulp, at most 2^-8 relative) with room, as
/// about 1.3 ulps of the f32 reference.
const BF16_REL: f64 = 1e-2;
const BF16_ABS: f64 = 1e-5;

/// The value of `f` at `inputs` (f32 on the CPU) and the gradients of `sum(f * g)`, i.e. the
/// backward of `f` for the output gradient `g`, for every input.
fn value_and_grads(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[(&[f32], &[usize])],
    g: &[f32],
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(v, shape)| Var::from_tensor(&tensor(v, shape)).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let gt = tensor(g, y.dims());
    let store = (&y * &gt).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = ts
        .iter()
        .map(|t| flat(store.get(t).expect("a gradient")))
        .collect();
    (flat(&y), grads)
}

// ---------------------------------------------------------------------------------------
// training_ops.cu, launched as cuda/training_ops.rs launches it.

/// As launched by `training_ops.rs::rms_norm_fwd_in`: one block per row of `n = w.len()`.
fn rms_norm_fwd_on_cpu<T: Elem>(x: &[T], w: &[T], eps: f32) -> Vec<T> {
    let lib = library("training_ops");
    let f = lib.entry::<abi::rms_norm_fwd::Kernel, T>();
    let (n, len) = (w.len(), x.len());
    let mut y = vec![T::UNWRITTEN; len];
    let (xp, wp, yp, n32) = (x.as_ptr(), w.as_ptr(), y.as_mut_ptr(), n as i32);
    if len > 0 && n > 0 {
        let l = grid::ops_rows(len / n);
        unsafe { lib.launch(l, || f(xp, wp, yp, n32, eps)) };
    }
    y
}

/// As launched by `training_ops.rs::RmsNormGrads::launch`: `(2, rows, n)` f32, dx then each row's
/// dw (which `rms_norm_grads` sums over rows).
fn rms_norm_bwd_on_cpu<T: Elem>(x: &[T], w: &[T], g: &[T], eps: f32) -> Vec<f32> {
    let lib = library("training_ops");
    let f = lib.entry::<abi::rms_norm_bwd::Kernel, T>();
    let (n, len) = (w.len(), x.len());
    let rows = (len / n.max(1)) as i64;
    let mut out = vec![f32::NAN; 2 * len];
    let (xp, wp, gp, op, n32) = (
        x.as_ptr(),
        w.as_ptr(),
        g.as_ptr(),
        out.as_mut_ptr(),
        n as i32,
    );
    if rows > 0 {
        let l = grid::ops_rows(rows as usize);
        unsafe { lib.launch(l, || f(xp, wp, gp, op, rows, n32, eps)) };
    }
    out
}

/// `rms_norm_{fwd,bwd}` (f32) and `_bf16` against `fused::rms_norm` and its gradients, rows
/// wider than the block (300 > 256 threads) and narrower (20).
fn check_rms_norm<T: Elem>(rel: f64, abs: f64) {
    let [fwd, bwd] =
        [abi::rms_norm_fwd::DECL, abi::rms_norm_bwd::DECL].map(|d| d.symbol(T::SUFFIX).unwrap());
    let eps = 1e-5f32;
    for (rows, n, seed) in [(10usize, 300usize, 1u64), (3, 20, 5)] {
        let x = rounded::<T>(&values(rows * n, seed, 2.0));
        let w: Vec<f32> = rounded::<T>(
            &values(n, seed + 1, 0.5)
                .iter()
                .map(|v| v + 1.0)
                .collect::<Vec<_>>(),
        );
        let g = rounded::<T>(&values(rows * n, seed + 2, 1.0));
        let (want_y, want) = value_and_grads(
            &|t| fused::rms_norm(&t[0], &t[1], eps as f64),
            &[(&x, &[rows, n]), (&w, &[n])],
            &g,
        );
        let (xe, we, ge) = (elems::<T>(&x), elems::<T>(&w), elems::<T>(&g));
        let y = to_f32s(&rms_norm_fwd_on_cpu(&xe, &we, eps));
        assert_close(&format!("{fwd} y ({rows}x{n})"), &y, &want_y, rel, abs);
        // The backward writes f32 whatever the operands: the f32 tolerance for both dtypes.
        let out = rms_norm_bwd_on_cpu(&xe, &we, &ge, eps);
        assert_close(
            &format!("{bwd} dx ({rows}x{n})"),
            &out[..rows * n],
            &want[0],
            F32_REL,
            F32_ABS,
        );
        // dw: the rows' parts summed over rows in f32, as `rms_norm_grads` does after.
        let dw: Vec<f32> = (0..n)
            .map(|c| (0..rows).map(|r| out[rows * n + r * n + c]).sum())
            .collect();
        assert_close(
            &format!("{bwd} dw ({rows}x{n})"),
            &dw,
            &want[1],
            F32_REL,
            F32_ABS,
        );
    }
}

#[test]
fn rms_norm_kernels_match_the_fused_norm_and_its_gradients() {
    check_rms_norm::<f32>(F32_REL, F32_ABS);
}

#[test]
fn bf16_rms_norm_kernels_match_the_fused_norm_on_rounded_operands() {
    check_rms_norm::<u16>(BF16_REL, BF16_ABS);
}

/// As launched by `training_ops.rs::elementwise` for `swiglu_fwd` (inputs a, b; one output) and
/// `swiglu_bwd` (inputs a, b, g; two outputs, da then db).
fn swiglu_on_cpu<T: Elem>(a: &[T], b: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
    let lib = library("training_ops");
    let len = a.len();
    let l = grid::ops_elementwise(len);
    let n = len as i64;
    let fwd = lib.entry::<abi::swiglu_fwd::Kernel, T>();
    let mut y = vec![T::UNWRITTEN; len];
    let (ap, bp, gp, yp) = (a.as_ptr(), b.as_ptr(), g.as_ptr(), y.as_mut_ptr());
    unsafe { lib.launch(l, || fwd(ap, bp, yp, n)) };
    let bwd = lib.entry::<abi::swiglu_bwd::Kernel, T>();
    let mut out = vec![T::UNWRITTEN; 2 * len];
    let op = out.as_mut_ptr();
    unsafe { lib.launch(l, || bwd(ap, bp, gp, op, n)) };
    (y, out)
}

/// `swiglu_{fwd,bwd}_*` against `fused::swiglu` and its gradients, over 11 blocks with a
/// partial last one and gates up to +-6 (sigmoid near saturation).
fn check_swiglu<T: Elem>(rel: f64, abs: f64) {
    let len = 2 * 3 * 457;
    let a = rounded::<T>(&values(len, 3, 6.0));
    let b = rounded::<T>(&values(len, 4, 2.0));
    let g = rounded::<T>(&values(len, 5, 1.0));
    let (want_y, want) = value_and_grads(
        &|t| fused::swiglu(&t[0], &t[1]),
        &[(&a, &[len]), (&b, &[len])],
        &g,
    );
    let suffix = T::SUFFIX;
    let (y, out) = swiglu_on_cpu(&elems::<T>(&a), &elems::<T>(&b), &elems::<T>(&g));
    let out = to_f32s(&out);
    assert_close(
        &format!("swiglu_fwd_{suffix}"),
        &to_f32s(&y),
        &want_y,
        rel,
        abs,
    );
    assert_close(
        &format!("swiglu_bwd_{suffix} da"),
        &out[..len],
        &want[0],
        rel,
        abs,
    );
    assert_close(
        &format!("swiglu_bwd_{suffix} db"),
        &out[len..],
        &want[1],
        rel,
        abs,
    );
}

#[test]
fn swiglu_kernels_match_the_fused_activation_and_its_gradients() {
    check_swiglu::<f32>(F32_REL, F32_ABS);
}

#[test]
fn bf16_swiglu_kernels_match_the_fused_activation_on_rounded_operands() {
    check_swiglu::<u16>(BF16_REL, BF16_ABS);
}

/// Rotary tables as the decoder builds them: `(positions, d / 2)`.
fn rope_tables(positions: usize, d: usize) -> (Vec<f32>, Vec<f32>) {
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let angles: Vec<f32> = (0..positions)
        .flat_map(|p| inv.iter().map(move |f| p as f32 * f))
        .collect();
    (
        angles.iter().map(|a| a.cos()).collect(),
        angles.iter().map(|a| a.sin()).collect(),
    )
}

/// As launched by `training_ops.rs::rope`: `x` (b, h, t, d) f32, tables (t, d / 2) (`fused::rope`
/// hands the kernel its tables narrowed to `t` rows).
fn rope_on_cpu(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    cos: &[f32],
    sin: &[f32],
    sign: f32,
) -> Vec<f32> {
    let lib = library("training_ops");
    let f = lib.entry::<abi::rope::Kernel, f32>();
    let (b, h, t, d) = dims;
    let rows = (b * h * t) as i64;
    let len = x.len();
    let mut y = vec![f32::NAN; len];
    let (xp, cp, sp, yp) = (x.as_ptr(), cos.as_ptr(), sin.as_ptr(), y.as_mut_ptr());
    let (t32, d32) = (t as i32, d as i32);
    if len > 0 {
        let l = grid::ops_elementwise(len / 2);
        unsafe { lib.launch(l, || f(xp, cp, sp, yp, rows, t32, d32, sign)) };
    }
    y
}

/// `rope_f32` with sign +1 against `fused::rope`, and with sign -1 (its backward) against
/// the rotation's gradient.
#[test]
fn rope_kernel_matches_the_fused_rotation_and_its_gradient() {
    let dims @ (b, h, t, d) = (2, 3, 13, 64);
    let (cos, sin) = rope_tables(t, d);
    let x = values(b * h * t * d, 7, 1.5);
    let g = values(b * h * t * d, 8, 1.0);
    let (ct, st) = (tensor(&cos, &[t, d / 2]), tensor(&sin, &[t, d / 2]));
    let (want_y, want) = value_and_grads(
        &|v| fused::rope(&v[0], &ct, &st),
        &[(&x, &[b, h, t, d])],
        &g,
    );
    let y = rope_on_cpu(&x, dims, &cos, &sin, 1.0);
    assert_close("rope_f32 y", &y, &want_y, F32_REL, F32_ABS);
    let dx = rope_on_cpu(&g, dims, &cos, &sin, -1.0);
    assert_close("rope_f32 dx (sign -1)", &dx, &want[0], F32_REL, F32_ABS);
}

/// As launched by `training_ops.rs::softmax_fwd` and `softmax_bwd`: one block per row of `n`.
fn softmax_on_cpu(x: &[f32], g: &[f32], n: usize) -> (Vec<f32>, Vec<f32>) {
    let lib = library("training_ops");
    let fwd = lib.entry::<abi::softmax_fwd::Kernel, f32>();
    let bwd = lib.entry::<abi::softmax_bwd::Kernel, f32>();
    let len = x.len();
    let n32 = n as i32;
    let l = grid::ops_rows(len / n);
    let mut y = vec![f32::NAN; len];
    let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
    unsafe { lib.launch(l, || fwd(xp, yp, n32)) };
    let mut dx = vec![f32::NAN; len];
    let (yp, gp, dp) = (y.as_ptr(), g.as_ptr(), dx.as_mut_ptr());
    unsafe { lib.launch(l, || bwd(yp, gp, dp, n32)) };
    (y, dx)
}

/// `softmax_{fwd,bwd}_f32` against `fused::softmax_last_dim` and its gradient: causal-mask
/// rows with -inf entries (as attention's scores), and rows of 300 > 256 threads.
#[test]
fn softmax_kernels_match_the_fused_softmax_and_its_gradient() {
    let (rows, n) = (12, 11);
    let masked: Vec<f32> = values(rows * n, 9, 4.0)
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if i % n > 6 + i / n % 6 {
                f32::NEG_INFINITY
            } else {
                v
            }
        })
        .collect();
    for (x, rows, n) in [(masked, rows, n), (values(3 * 300, 10, 6.0), 3, 300)] {
        let g = values(rows * n, 11, 1.0);
        let (want_y, want) =
            value_and_grads(&|t| fused::softmax_last_dim(&t[0]), &[(&x, &[rows, n])], &g);
        // The backward takes the kernel's own forward output, as on the GPU.
        let (y, dx) = softmax_on_cpu(&x, &g, n);
        assert_close(
            &format!("softmax_fwd_f32 ({rows}x{n})"),
            &y,
            &want_y,
            F32_REL,
            F32_ABS,
        );
        assert_close(
            &format!("softmax_bwd_f32 ({rows}x{n})"),
            &dx,
            &want[0],
            F32_REL,
            F32_ABS,
        );
        assert!(y
            .iter()
            .zip(&x)
            .all(|(y, x)| *x != f32::NEG_INFINITY || *y == 0.0));
    }
}

// ---------------------------------------------------------------------------------------
// training_attention.cu, launched as cuda/training_attention.rs launches it.

use grid::AttentionDims as AttnDims;

/// As launched by `training_attention.rs::rotate`: `x` (b, t, heads * d) into f32 (b, heads, t, d).
fn attn_rotate_on_cpu<T: Elem>(
    x: &[T],
    cos: &[f32],
    sin: &[f32],
    dims: AttnDims,
    heads: usize,
) -> Vec<f32> {
    let lib = library("training_attention");
    let f = lib.entry::<abi::attn_rotate::Kernel, T>();
    let mut out = vec![f32::NAN; dims.b * heads * dims.t * dims.d];
    let (t, _, _, d) = dims.i32s();
    let h32 = heads as i32;
    let (xp, cp, sp, op) = (x.as_ptr(), cos.as_ptr(), sin.as_ptr(), out.as_mut_ptr());
    let l = grid::attn_rotate(&dims, heads);
    unsafe { lib.launch(l, || f(xp, cp, sp, op, t, h32, d)) };
    out
}

/// As launched by `training_attention.rs::forward_in`: rotate q and k, then `attn_fwd_*`.
fn attn_forward_on_cpu<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    cos: &[f32],
    sin: &[f32],
    dims: AttnDims,
) -> Vec<T> {
    let lib = library("training_attention");
    let qr = attn_rotate_on_cpu(q, cos, sin, dims, dims.heads);
    let kr = attn_rotate_on_cpu(k, cos, sin, dims, dims.kv);
    let mut y = vec![T::UNWRITTEN; q.len()];
    let f = lib.entry::<abi::attn_fwd::Kernel, T>();
    let (t, h, kvh, d) = dims.i32s();
    let scale = dims.scale();
    let (qp, kp, vp, yp) = (qr.as_ptr(), kr.as_ptr(), v.as_ptr(), y.as_mut_ptr());
    let l = grid::attn_fwd(&dims);
    unsafe { lib.launch(l, || f(qp, kp, vp, yp, t, h, kvh, d, scale)) };
    y
}

/// As launched by `training_attention.rs::Grads::launch`: rotate q and k, the rows pass (dq, and
/// ds and p for the columns), then the columns pass (dk, dv). Returns `out` = dq, dk, dv end
/// to end, and the ds and p buffers.
fn attn_grads_on_cpu<T: Elem>(
    q: &[T],
    k: &[T],
    v: &[T],
    dy: &[T],
    cos: &[f32],
    sin: &[f32],
    dims: AttnDims,
) -> (Vec<T>, Vec<f32>, Vec<f32>) {
    let lib = library("training_attention");
    let qr = attn_rotate_on_cpu(q, cos, sin, dims, dims.heads);
    let kr = attn_rotate_on_cpu(k, cos, sin, dims, dims.kv);
    let (nq, nk) = (q.len(), k.len());
    let scores = dims.b * dims.heads * dims.t * dims.t;
    let mut ds = vec![f32::NAN; scores];
    let mut pr = vec![f32::NAN; scores];
    let mut out = vec![T::UNWRITTEN; nq + 2 * nk];
    let (t, h, kvh, d) = dims.i32s();
    let scale = dims.scale();
    let (qp, kp, vp, gp, cp, sp) = (
        qr.as_ptr(),
        kr.as_ptr(),
        v.as_ptr(),
        dy.as_ptr(),
        cos.as_ptr(),
        sin.as_ptr(),
    );
    let (dsp, prp) = (ds.as_mut_ptr(), pr.as_mut_ptr());
    let dq = out.as_mut_ptr();
    // SAFETY: `out` holds nq + 2 nk elements, split in three as the launch code splits it.
    let (dk, dv) = unsafe { (dq.add(nq), dq.add(nq + nk)) };
    let rows = lib.entry::<abi::attn_bwd_rows::Kernel, T>();
    let l = grid::attn_bwd_rows(&dims);
    unsafe {
        lib.launch(l, || {
            rows(qp, kp, vp, gp, cp, sp, dsp, prp, dq, t, h, kvh, d, scale)
        })
    };
    let cols = lib.entry::<abi::attn_bwd_cols::Kernel, T>();
    let cols_launch = grid::attn_bwd_cols(&dims);
    let (dsp, prp) = (ds.as_ptr(), pr.as_ptr());
    unsafe {
        lib.launch(cols_launch, || {
            cols(qp, gp, cp, sp, dsp, prp, dk, dv, t, h, kvh, d)
        })
    };
    (out, ds, pr)
}

/// The attention kernels of `T` (forward, and backward for the output gradient `dy`) against
/// `fused::causal_attention`'s CPU forward and gradients on the same (rounded) operands.
fn check_attention<T: Elem>(dims: AttnDims, seed: u64, rel: f64, abs: f64) {
    let AttnDims { b, t, heads, kv, d } = dims;
    // Tables longer than the sequences, as the decoder's: only the first t rows are read.
    let (cos, sin) = rope_tables(t + 3, d);
    let q = rounded::<T>(&values(b * t * heads * d, seed, 1.5));
    let k = rounded::<T>(&values(b * t * kv * d, seed + 1, 1.5));
    let v = rounded::<T>(&values(b * t * kv * d, seed + 2, 1.0));
    let dy = rounded::<T>(&values(b * t * heads * d, seed + 3, 1.0));
    let (ct, st) = (tensor(&cos, &[t + 3, d / 2]), tensor(&sin, &[t + 3, d / 2]));
    let (want_y, want) = value_and_grads(
        &|x| fused::causal_attention(&x[0], &x[1], &x[2], heads, kv, &ct, &st),
        &[
            (&q, &[b, t, heads * d]),
            (&k, &[b, t, kv * d]),
            (&v, &[b, t, kv * d]),
        ],
        &dy,
    );
    let (qe, ke, ve, dye) = (
        elems::<T>(&q),
        elems::<T>(&k),
        elems::<T>(&v),
        elems::<T>(&dy),
    );
    let what = format!(
        "{} (b {b}, t {t}, heads {heads}, kv {kv}, d {d})",
        T::SUFFIX
    );
    let y = to_f32s(&attn_forward_on_cpu(&qe, &ke, &ve, &cos, &sin, dims));
    assert_close(&format!("attention y, {what}"), &y, &want_y, rel, abs);
    let (out, ds, pr) = attn_grads_on_cpu(&qe, &ke, &ve, &dye, &cos, &sin, dims);
    let out = to_f32s(&out);
    let (nq, nk) = (q.len(), k.len());
    assert_close(
        &format!("attention dq, {what}"),
        &out[..nq],
        &want[0],
        rel,
        abs,
    );
    assert_close(
        &format!("attention dk, {what}"),
        &out[nq..nq + nk],
        &want[1],
        rel,
        abs,
    );
    assert_close(
        &format!("attention dv, {what}"),
        &out[nq + nk..],
        &want[2],
        rel,
        abs,
    );
    // The rows pass writes each row's keys up to its own and no further (the columns pass
    // reads only those): rows of probabilities that sum to 1, NaN past the diagonal.
    for (r, (p, s)) in pr.chunks_exact(t).zip(ds.chunks_exact(t)).enumerate() {
        let i = r % t;
        let sum: f32 = p[..=i].iter().sum();
        assert!(
            (sum - 1.0).abs() < 1e-5,
            "{what}: row {r} of p sums to {sum}"
        );
        assert!(
            s[..=i].iter().all(|x| x.is_finite()),
            "{what}: row {r} of ds"
        );
        assert!(
            p[i + 1..].iter().chain(&s[i + 1..]).all(|x| x.is_nan()),
            "{what}: row {r} past the diagonal"
        );
    }
}

/// 6 heads over 2 kv heads, 13 positions: the last block's warps partly past t.
const SHORT: AttnDims = AttnDims {
    b: 2,
    t: 13,
    heads: 6,
    kv: 2,
    d: 64,
};

/// 37 positions: each lane takes two keys of the later rows; 4 heads over 2 kv heads.
const LONG: AttnDims = AttnDims {
    b: 2,
    t: 37,
    heads: 4,
    kv: 2,
    d: 64,
};

#[test]
fn attention_kernels_match_the_fused_attention_and_its_gradients() {
    let dims = SHORT;
    check_attention::<f32>(dims, 20, F32_REL, F32_ABS);
}

#[test]
fn attention_kernels_loop_over_more_keys_than_lanes() {
    let dims = LONG;
    check_attention::<f32>(dims, 30, F32_REL, F32_ABS);
}

#[test]
fn bf16_attention_kernels_match_the_fused_attention_on_rounded_operands() {
    let dims = SHORT;
    check_attention::<u16>(dims, 40, BF16_REL, BF16_ABS);
}

#[test]
fn bf16_attention_kernels_loop_over_more_keys_than_lanes() {
    let dims = LONG;
    check_attention::<u16>(dims, 50, BF16_REL, BF16_ABS);
}

// ---------------------------------------------------------------------------------------
// The LoRA delta: forward by lora.cu with no `y`, backward by lora_training.cu, launched as
// cuda/lora_training.rs launches them.

/// As launched by `lora_training.rs`: `delta_of` (the delta, `(rows, outs)`) and `Grads::launch`
/// (`[dx | dA | dB]`).
#[allow(clippy::too_many_arguments)]
fn lora_on_cpu<T: Elem>(
    x: &[T],
    a: &[T],
    b: &[T],
    g: &[T],
    scale: f32,
    (rows, inp, outs, rank): (usize, usize, usize, usize),
) -> (Vec<T>, Vec<T>) {
    let (i32s, none) = ((inp as i32, outs as i32, rank as i32), 0i64);
    let (xp, ap, bp, gp) = (x.as_ptr(), a.as_ptr(), b.as_ptr(), g.as_ptr());
    let fwd = library("lora").entry::<abi::lora_add::Kernel, T>();
    let mut y = vec![T::UNWRITTEN; rows * outs];
    let yp = y.as_mut_ptr();
    let null = std::ptr::null();
    unsafe {
        library("lora").launch(grid::lora_add(rows), || {
            fwd(
                null,
                xp,
                ap,
                bp,
                std::ptr::null(),
                scale,
                yp,
                i32s.0,
                i32s.1,
                i32s.2,
                none,
                none,
                none,
            )
        })
    };
    let lib = library("lora_training");
    let rows_k = lib.entry::<abi::lora_bwd_rows::Kernel, T>();
    let cols_k = lib.entry::<abi::lora_bwd_cols::Kernel, T>();
    let (nx, na, nb) = (rows * inp, rank * inp, outs * rank);
    let (mut h, mut dh) = (vec![f32::NAN; rows * rank], vec![f32::NAN; rows * rank]);
    let mut out = vec![T::UNWRITTEN; nx + na + nb];
    let (hp, dhp, op) = (h.as_mut_ptr(), dh.as_mut_ptr(), out.as_mut_ptr());
    unsafe {
        lib.launch(grid::lora_bwd_rows(rows), || {
            rows_k(xp, ap, bp, gp, scale, hp, dhp, op, i32s.0, i32s.1, i32s.2)
        });
        lib.launch(grid::lora_bwd_cols(na + nb), || {
            cols_k(
                xp,
                gp,
                hp,
                dhp,
                scale,
                op.add(nx),
                op.add(nx + na),
                rows as i64,
                i32s.0,
                i32s.1,
                i32s.2,
            )
        });
    }
    (y, out)
}

/// The delta and its gradients against `fused::lora_delta`'s CPU body (itself held to the
/// composed delta by the fused tests): rows over several blocks, an input wider than a
/// block, a rank above the block's 8 warps, more outputs than threads.
fn check_lora<T: Elem>(rel: f64, abs: f64) {
    let (rows, inp, outs, rank, scale) = (2 * 7, 300, 260, 11, 1.75f32);
    let x = rounded::<T>(&values(rows * inp, 60, 1.0));
    let a = rounded::<T>(&values(rank * inp, 61, 0.2));
    let b = rounded::<T>(&values(outs * rank, 62, 0.2));
    let g = rounded::<T>(&values(rows * outs, 63, 1.0));
    let (want_y, want) = value_and_grads(
        &|t| fused::lora_delta(&t[0], &t[1], &t[2], scale as f64),
        &[(&x, &[2, 7, inp]), (&a, &[rank, inp]), (&b, &[outs, rank])],
        &g,
    );
    let (y, out) = lora_on_cpu(
        &elems::<T>(&x),
        &elems::<T>(&a),
        &elems::<T>(&b),
        &elems::<T>(&g),
        scale,
        (rows, inp, outs, rank),
    );
    let out = to_f32s(&out);
    let (nx, na) = (rows * inp, rank * inp);
    let suffix = T::SUFFIX;
    assert_close(
        &format!("lora delta {suffix}"),
        &to_f32s(&y),
        &want_y,
        rel,
        abs,
    );
    assert_close(&format!("lora dx {suffix}"), &out[..nx], &want[0], rel, abs);
    assert_close(
        &format!("lora dA {suffix}"),
        &out[nx..nx + na],
        &want[1],
        rel,
        abs,
    );
    assert_close(
        &format!("lora dB {suffix}"),
        &out[nx + na..],
        &want[2],
        rel,
        abs,
    );
}

#[test]
fn lora_delta_kernels_match_the_fused_delta_and_its_gradients() {
    // Sums of up to 300 products of either sign: 1e-5 relative plus 1e-5 absolute.
    check_lora::<f32>(F32_REL, 1e-5);
}

#[test]
fn bf16_lora_delta_kernels_match_the_fused_delta_on_rounded_operands() {
    check_lora::<u16>(BF16_REL, 1e-3);
}
