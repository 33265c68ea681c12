//! `optimizer.cu` (the multi-tensor AdamW step) on the CPU, launched exactly as
//! `model/kernels/cuda/optimizer.rs` launches it, against `FastAdamW`'s in-place loop
//! (`adapt/adamw.rs`), the CPU path the kernels replace.

use std::ptr::null;

use candle_core::{Tensor, Var};
use candle_nn::ParamsAdamW;

use crate::adapt::{global_norm, FastAdamW};
use crate::model::cuda_on_cpu::*;

/// Elements of one tensor a block takes (`cuda_abi::grid`, checked against `optimizer.cu`).
const CHUNK: usize = grid::OPTIMIZER_CHUNK;

/// Elements past the end of every buffer a launch is given: none may be written (they hold
/// `SENTINEL`) and, in gradients, none may be read (they hold NaN, which would reach the
/// norm or the weights).
const GUARD: usize = 16;
const SENTINEL: f32 = -4096.0; // exact in bf16 too

/// `values` then `GUARD` copies of `guard`.
fn guarded<T: Elem>(values: &[f32], guard: f32) -> Vec<T> {
    let mut out: Vec<T> = elems(values);
    out.extend(std::iter::repeat_n(T::of(guard), GUARD));
    out
}

/// The guard past `n` elements of `buf` still holds `SENTINEL`.
fn assert_guard<T: Elem>(buf: &[T], n: usize, what: &str) {
    for (k, x) in buf[n..].iter().enumerate() {
        assert_eq!(
            x.f32(),
            SENTINEL,
            "{what}: element {} past the end was written",
            k
        );
    }
}

/// `AdamWStep` (`cuda/optimizer.rs`) as `cuda_step` (`adapt/adamw.rs`) fills it at step `t`.
struct Step {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    c1: f64,
    c2: f64,
}

fn step_at(p: &ParamsAdamW, t: i32) -> Step {
    Step {
        lr: p.lr,
        beta1: p.beta1,
        beta2: p.beta2,
        eps: p.eps,
        weight_decay: p.weight_decay,
        c1: 1.0 - p.beta1.powi(t),
        c2: 1.0 - p.beta2.powi(t),
    }
}

/// `GradScale` (`cuda/optimizer.rs`).
#[derive(Clone, Copy)]
enum GradScale {
    By(f64),
    ClipNorm(f64),
}

/// `MultiTensorAdamW` (`cuda/optimizer.rs`) over host buffers: the tables and buffers
/// `MultiTensorAdamW::new` builds and the launches of `MultiTensorAdamW::step`/`launch`.
struct MultiTensor {
    /// Per tensor: moment offset, length, first block, 0.
    meta: Vec<i64>,
    spans: Vec<(usize, usize)>,
    blocks: usize,
    /// The flat moments (zeros, as `new` makes them), then the guard.
    m: Vec<f32>,
    v: Vec<f32>,
    /// One partial sum of squares per block, then the guard.
    partial: Vec<f64>,
    /// The norm and the clipping multiplier, then the guard.
    norm: Vec<f64>,
}

impl MultiTensor {
    /// Mirrors `MultiTensorAdamW::new`.
    fn new(lens: &[usize]) -> Self {
        let (mut offset, mut block) = (0usize, 0usize);
        let mut meta = Vec::with_capacity(lens.len() * 4);
        let mut spans = Vec::with_capacity(lens.len());
        for &n in lens {
            meta.extend([offset as i64, n as i64, block as i64, 0]);
            spans.push((offset, n));
            offset += n;
            block += n.div_ceil(CHUNK);
        }
        let moments = || {
            let mut x = vec![0f32; offset];
            x.extend([SENTINEL; GUARD]);
            x
        };
        let f64s = |n: usize| {
            let mut x = vec![f64::NAN; n];
            x.extend([SENTINEL as f64; GUARD]);
            x
        };
        Self {
            meta,
            spans,
            blocks: block,
            m: moments(),
            v: moments(),
            partial: f64s(block),
            norm: f64s(2),
        }
    }

    /// Mirrors `MultiTensorAdamW::step` and `MultiTensorAdamW::launch`: the pointer table
    /// [weight, gradient] per tensor, then `sum_squares_*` over every block and `norm_scale`
    /// in one block (under `ClipNorm`), then `adamw_*` over every block, each with THREADS
    /// threads and no dynamic shared memory. `partial` and `norm` are NaN before the launches.
    fn step<T: Elem>(
        &mut self,
        weights: &mut [Vec<T>],
        grads: &[Vec<T>],
        p: &Step,
        scale: GradScale,
    ) {
        assert_eq!(weights.len(), self.spans.len());
        assert_eq!(grads.len(), self.spans.len());
        for ((w, g), &(_, n)) in weights.iter().zip(grads).zip(&self.spans) {
            assert_eq!((w.len(), g.len()), (n + GUARD, n + GUARD));
        }
        if self.blocks == 0 {
            return;
        }
        let lib = library("optimizer");
        self.partial[..self.blocks].fill(f64::NAN);
        self.norm[..2].fill(f64::NAN);
        let table: Vec<i64> = weights
            .iter_mut()
            .zip(grads)
            .flat_map(|(w, g)| [w.as_mut_ptr() as i64, g.as_ptr() as i64])
            .collect();
        let (table, meta) = (table.as_ptr(), self.meta.as_ptr());
        let (m, v) = (self.m.as_mut_ptr(), self.v.as_mut_ptr());
        let (partial, norm) = (self.partial.as_mut_ptr(), self.norm.as_mut_ptr());
        let n = self.spans.len() as i32;
        // SAFETY (all launches): the signatures are the kernels' own; every address in
        // `table` and every buffer covers what `meta` describes (plus the guard), and the
        // grids cover exactly `self.blocks` blocks as the launch code's do.
        let (scale_at, host_scale): (*const f64, f32) = match scale {
            GradScale::By(k) => (null(), k as f32),
            GradScale::ClipNorm(clip) => {
                let f = lib.entry::<abi::sum_squares::Kernel, T>();
                unsafe { lib.launch(grid::optimizer(self.blocks), || f(table, meta, n, partial)) };
                let f = lib.entry::<abi::norm_scale::Kernel, f32>();
                let blocks = self.blocks as i64;
                unsafe { lib.launch(grid::optimizer(1), || f(partial, blocks, clip, norm)) };
                (norm as *const f64, 1.0f32)
            }
        };
        let f = lib.entry::<abi::adamw::Kernel, T>();
        let lr = p.lr as f32;
        let (b1, b2, eps) = (p.beta1 as f32, p.beta2 as f32, p.eps as f32);
        let decay = 1.0 - lr * p.weight_decay as f32;
        let (inv_c1, inv_c2) = (1.0 / p.c1 as f32, 1.0 / p.c2 as f32);
        unsafe {
            lib.launch(grid::optimizer(self.blocks), || {
                f(
                    table, meta, n, m, v, scale_at, host_scale, lr, b1, b2, eps, decay, inv_c1,
                    inv_c2,
                )
            })
        };
    }

    /// Each tensor's (m, v), as `MultiTensorAdamW::moments` returns them; checks the guards.
    fn moments(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        let total: usize = self.spans.iter().map(|s| s.1).sum();
        assert_guard(&self.m, total, "m");
        assert_guard(&self.v, total, "v");
        self.spans
            .iter()
            .map(|&(o, n)| (self.m[o..o + n].to_vec(), self.v[o..o + n].to_vec()))
            .collect()
    }

    /// The partial sums, the norm and the multiplier of the last `ClipNorm` step.
    fn norms(&self) -> (&[f64], f64, f64) {
        let untouched = |buf: &[f64], n: usize| buf[n..].iter().all(|&x| x == SENTINEL as f64);
        assert!(
            untouched(&self.partial, self.blocks),
            "partial: written past the end"
        );
        assert!(untouched(&self.norm, 2), "norm: written past the end");
        (&self.partial[..self.blocks], self.norm[0], self.norm[1])
    }
}

/// The CPU reference: `FastAdamW` on f32 CPU variables (its in-place loop).
struct Reference {
    vars: Vec<Var>,
    opt: FastAdamW,
}

impl Reference {
    fn new(weights: &[Vec<f32>], p: &ParamsAdamW) -> Self {
        let vars: Vec<Var> = weights
            .iter()
            .map(|w| Var::from_tensor(&tensor(w, &[w.len()])).unwrap())
            .collect();
        let opt = FastAdamW::new(vars.clone(), p.clone()).unwrap();
        assert_eq!(opt.path(), "cpu", "the reference is the in-place loop");
        Self { vars, opt }
    }

    fn weights(&self) -> Vec<Vec<f32>> {
        self.vars
            .iter()
            .map(|v| v.as_tensor().to_vec1::<f32>().unwrap())
            .collect()
    }

    fn moments(&self) -> Vec<(Vec<f32>, Vec<f32>)> {
        self.opt.state().expect("the in-place loop's state").1
    }

    /// Overwrites the weights (the moments stay).
    fn set_weights(&self, weights: &[Vec<f32>]) {
        for (var, w) in self.vars.iter().zip(weights) {
            var.set(&tensor(w, &[w.len()])).unwrap();
        }
    }
}

fn tensors(values: &[Vec<f32>]) -> Vec<Tensor> {
    values.iter().map(|g| tensor(g, &[g.len()])).collect()
}

/// `n` deterministic values of magnitude in [0.05, 1] times `amp`, of either sign (never 0,
/// so every moment and weight moves and an element a launch skips shows).
fn nonzero(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    values(n, seed, 1.0)
        .into_iter()
        .map(|u| (amp * (0.05 + 0.95 * u.abs())).copysign(u))
        .collect()
}

/// Each tensor's values (`GUARD` excluded) as f32.
fn unguarded<T: Elem>(bufs: &[Vec<T>], lens: &[usize], what: &str) -> Vec<Vec<f32>> {
    bufs.iter()
        .zip(lens)
        .enumerate()
        .map(|(t, (b, &n))| {
            assert_guard(b, n, &format!("{what} of tensor {t}"));
            to_f32s(&b[..n])
        })
        .collect()
}

/// Each tensor of `got` within `rel * max(|want|, floor)` of `want`, element by element.
#[track_caller]
fn assert_tensors_close(got: &[Vec<f32>], want: &[Vec<f32>], rel: f64, floor: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: tensors");
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        assert_close_with(&format!("{what}: tensor {t}"), g, w, |_, w| {
            rel * w.abs().max(floor)
        });
    }
}

/// Partial sums per CHUNK block of each tensor's gradients, in f64.
fn block_sums(grads: &[Vec<f32>]) -> Vec<f64> {
    grads
        .iter()
        .flat_map(|g| {
            g.chunks(CHUNK)
                .map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        })
        .collect()
}

/// The multiplier `FastAdamW::step_clipped` applies.
fn clip_multiplier(norm: f64, clip: f64) -> f64 {
    if clip > 0.0 && norm > clip {
        clip / (norm + 1e-6)
    } else {
        1.0
    }
}

/// Checks the partial sums, the norm and the multiplier of a `ClipNorm` step against the
/// gradients: f64 sums in another order, so 1e-12 relative.
fn check_norms(kernels: &MultiTensor, grads: &[Vec<f32>], clip: f64, clipped: bool) {
    let (partial, norm, multiplier) = kernels.norms();
    let want = block_sums(grads);
    assert_eq!(partial.len(), want.len(), "one partial sum per block");
    for (b, (&got, &want)) in partial.iter().zip(&want).enumerate() {
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "partial sum of block {b}: {got} vs {want}"
        );
    }
    let want_norm = global_norm(&tensors(grads)).unwrap();
    assert!(
        (norm - want_norm).abs() <= 1e-12 * want_norm,
        "norm {norm} vs {want_norm}"
    );
    assert_eq!(
        norm > clip && clip > 0.0,
        clipped,
        "the test's premise: clipping {clipped}"
    );
    let want = clip_multiplier(want_norm, clip);
    assert!(
        (multiplier - want).abs() <= 1e-12 * want,
        "multiplier {multiplier} vs {want}"
    );
    if !clipped {
        assert_eq!(multiplier, 1.0);
    }
}

fn params() -> ParamsAdamW {
    ParamsAdamW {
        lr: 0.05,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

/// f32 weights: tensors of 3, 4096 (one full block), 0 (no block: its first block is the
/// next tensor's), 5000 and 9000 elements (2 and 3 blocks, the last partial), 7 blocks in
/// all. Step 1 clips (norm > clip), step 2 does not (clip > norm), step 3 scales by a host
/// factor (`GradScale::By`, no norm launch); the moments carry from step to step. Weights,
/// m and v are within 1e-6 relative of `FastAdamW` (the same f32 operations in the same
/// order, so in practice equal; the floor 1 for weights, which are O(1), and 1e-30 for the
/// moments allows for cancellation near 0), partial sums, norm and multiplier within 1e-12.
#[test]
fn adamw_f32_matches_fast_adamw_clipped_unclipped_and_scaled() {
    let lens = [3usize, 4096, 0, 5000, 9000];
    let p = params();
    let init: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(t, &n)| nonzero(t as u64 + 1, n, 1.0))
        .collect();
    let mut weights: Vec<Vec<f32>> = init.iter().map(|w| guarded(w, SENTINEL)).collect();
    let mut reference = Reference::new(&init, &p);
    let mut kernels = MultiTensor::new(&lens);
    assert_eq!(kernels.blocks, 7);
    let steps = [
        GradScale::ClipNorm(1.0),
        GradScale::ClipNorm(1e4),
        GradScale::By(0.5),
    ];
    for (s, &scale) in steps.iter().enumerate() {
        let t = s as i32 + 1;
        let grads: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| nonzero(100 * t as u64 + i as u64, n, 1.0 + i as f32 * 0.5))
            .collect();
        let kernel_grads: Vec<Vec<f32>> = grads.iter().map(|g| guarded(g, f32::NAN)).collect();
        kernels.step(&mut weights, &kernel_grads, &step_at(&p, t), scale);
        match scale {
            GradScale::ClipNorm(clip) => {
                reference.opt.step_clipped(&tensors(&grads), clip).unwrap();
                check_norms(&kernels, &grads, clip, s == 0);
            }
            GradScale::By(k) => reference.opt.step(&tensors(&grads), k).unwrap(),
        }
        let what = format!("step {t}");
        let got = unguarded(&weights, &lens, &format!("{what} weights"));
        assert_tensors_close(
            &got,
            &reference.weights(),
            1e-6,
            1.0,
            &format!("{what} weights"),
        );
        let (km, kv): (Vec<_>, Vec<_>) = kernels.moments().into_iter().unzip();
        let (rm, rv): (Vec<_>, Vec<_>) = reference.moments().into_iter().unzip();
        assert_tensors_close(&km, &rm, 1e-6, 1e-30, &format!("{what} m"));
        assert_tensors_close(&kv, &rv, 1e-6, 1e-30, &format!("{what} v"));
    }
}

/// bf16 weights and gradients: tensors of 5000, 3, 9000 and 4096 elements (7 blocks). The
/// reference runs in f32 on the bf16-rounded weights and gradients. Step 1 clips, step 2 has
/// clipping off (clip 0). Each kernel weight is the reference's rounded to bf16: within one
/// bf16 ulp of it (rounding to nearest is half an ulp; the rest allows for f32 noise at a
/// rounding tie and at a power of two). Before step 2 the reference takes the kernel's
/// rounded weights, so each step is checked from the same weights. The moments (f32 in both,
/// from the same bf16 gradients) are within 1e-6 relative; norms as for f32.
#[test]
fn adamw_bf16_matches_fast_adamw_on_rounded_values() {
    let lens = [5000usize, 3, 9000, 4096];
    let p = params();
    let init: Vec<Vec<f32>> = lens
        .iter()
        .enumerate()
        .map(|(t, &n)| rounded::<u16>(&nonzero(t as u64 + 7, n, 1.0)))
        .collect();
    let mut weights: Vec<Vec<u16>> = init.iter().map(|w| guarded(w, SENTINEL)).collect();
    let mut reference = Reference::new(&init, &p);
    let mut kernels = MultiTensor::new(&lens);
    assert_eq!(kernels.blocks, 7);
    let mut ulps_off = 0usize;
    for (s, clip) in [1.0f64, 0.0].into_iter().enumerate() {
        let t = s as i32 + 1;
        let grads: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                rounded::<u16>(&nonzero(200 * t as u64 + i as u64, n, 1.0 + i as f32 * 0.5))
            })
            .collect();
        let kernel_grads: Vec<Vec<u16>> = grads.iter().map(|g| guarded(g, f32::NAN)).collect();
        let before = unguarded(&weights, &lens, "weights");
        reference.set_weights(&before);
        kernels.step(
            &mut weights,
            &kernel_grads,
            &step_at(&p, t),
            GradScale::ClipNorm(clip),
        );
        reference.opt.step_clipped(&tensors(&grads), clip).unwrap();
        check_norms(&kernels, &grads, clip, s == 0);
        let got = unguarded(&weights, &lens, &format!("step {t} weights"));
        for (i, (g, w)) in got.iter().zip(&reference.weights()).enumerate() {
            for (j, (&a, &b)) in g.iter().zip(w).enumerate() {
                let ulp =
                    f32::from_bits(b.abs().to_bits() & 0x7f80_0000).max(f32::MIN_POSITIVE) / 128.0;
                assert!(
                    (a - b).abs() <= ulp,
                    "step {t} weights: tensor {i} element {j}: kernel {a}, reference {b} (ulp {ulp})"
                );
                ulps_off += (a != from_bf16(bf16_bits(b))) as usize;
            }
        }
        // Every weight moved: the update was applied (and stored rounded, as bf16 bits).
        assert!(got
            .iter()
            .zip(&before)
            .flat_map(|(a, b)| a.iter().zip(b))
            .all(|(a, b)| a != b));
        let (km, kv): (Vec<_>, Vec<_>) = kernels.moments().into_iter().unzip();
        let (rm, rv): (Vec<_>, Vec<_>) = reference.moments().into_iter().unzip();
        assert_tensors_close(&km, &rm, 1e-6, 1e-30, &format!("step {t} m"));
        assert_tensors_close(&kv, &rv, 1e-6, 1e-30, &format!("step {t} v"));
    }
    // Rounding the reference's f32 result gives the kernel's bf16 almost everywhere.
    let total: usize = lens.iter().sum::<usize>() * 2;
    assert!(
        ulps_off * 1000 <= total,
        "{ulps_off} of {total} weights differ from the rounded reference"
    );
}

/// `norm_scale` alone over more partial sums than threads (1000: each thread adds several):
/// the norm is the square root of their sum (1e-12 relative), the multiplier is
/// clip / (norm + 1e-6) only when 0 < clip < norm, and the same partials give the same bits.
#[test]
fn norm_scale_adds_more_partials_than_threads_and_clips_only_above_the_norm() {
    let lib = library("optimizer");
    let f = lib.entry::<abi::norm_scale::Kernel, f32>();
    let partial: Vec<f64> = (0..1000).map(|i| 0.25 + (i % 17) as f64 * 0.5).collect();
    let want_norm = partial.iter().sum::<f64>().sqrt();
    let run = |clip: f64| {
        let mut out = [f64::NAN; 2];
        let (p, o, blocks) = (partial.as_ptr(), out.as_mut_ptr(), partial.len() as i64);
        // SAFETY: `partial` holds `blocks` f64 and `out` two, as the kernel reads and writes.
        unsafe { lib.launch(grid::optimizer(1), || f(p, blocks, clip, o)) };
        out
    };
    let clipped = run(2.0);
    assert!(
        (clipped[0] - want_norm).abs() <= 1e-12 * want_norm,
        "{} vs {want_norm}",
        clipped[0]
    );
    let k = 2.0 / (want_norm + 1e-6);
    assert!((clipped[1] - k).abs() <= 1e-12 * k, "{} vs {k}", clipped[1]);
    assert_eq!(
        run(2.0).map(f64::to_bits),
        clipped.map(f64::to_bits),
        "run to run"
    );
    for clip in [want_norm * 2.0, 0.0, -1.0] {
        let out = run(clip);
        assert_eq!(
            out[0].to_bits(),
            clipped[0].to_bits(),
            "clip {clip}: the norm"
        );
        assert_eq!(out[1], 1.0, "clip {clip}: no clipping");
    }
}
