//! Causal self-attention with rotary position embedding, from the projections' outputs to
//! the heads' concatenated values, and its backward. Written for the few short sequences of
//! adaptation (plain loops, O(t^2) per head): the composed path's transposes, head repeats,
//! mask, softmax and two batched products are ~15 candle ops forward and ~30 backward.

use candle_core::utils::barrier_pool;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{axpy, dot, slice, with_f32};

/// Most positions this op takes; longer inputs belong to the composed path's products.
pub const MAX_POSITIONS: usize = 256;

struct Attention {
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    /// `(positions, head_dim / 2)` rotary tables.
    cos: Tensor,
    sin: Tensor,
}

/// Where tasks write their disjoint parts of an output.
struct Out(*mut f32);
// SAFETY: each task writes only the heads of its own (sequence, kv head) pair.
unsafe impl Sync for Out {}

impl Out {
    /// # Safety
    /// `at..at + len` lies in the buffer and no other task touches it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part(&self, at: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// The shapes of one call: `b` sequences of `t` positions, rows of `qd` (queries) and `kd`
/// (keys, values) floats.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    qd: usize,
    kd: usize,
}

impl Attention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (b, t, qd) = q.shape().dims3()?;
        let (kd, d) = (self.n_kv * self.head_dim, self.head_dim);
        let kv = (b, t, kd);
        if qd != self.n_heads * d || k.shape().dims3()? != kv || v.shape().dims3()? != kv {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} for {} heads, {} kv heads of {d}",
                q.shape(),
                k.shape(),
                v.shape(),
                self.n_heads,
                self.n_kv
            );
        }
        if t > self.cos.dim(0)? {
            candle_core::bail!("attention: {t} positions, rotary tables for fewer");
        }
        Ok(Dims { b, t, qd, kd })
    }

    /// [`Self::dims`] as the GPU kernels take them.
    #[cfg(feature = "cuda")]
    fn cuda_dims(
        &self,
        q: &Layout,
        k: &Layout,
        v: &Layout,
    ) -> Result<crate::model::kernels::cuda::training_attention::AttentionDims> {
        let dims = self.dims(q, k, v)?;
        Ok(
            crate::model::kernels::cuda::training_attention::AttentionDims {
                b: dims.b,
                t: dims.t,
                heads: self.n_heads,
                kv: self.n_kv,
                d: self.head_dim,
            },
        )
    }

    /// Runs `task(sequence, kv head)` for every pair on the thread pool, with the rotary
    /// tables.
    fn each(&self, dims: Dims, task: impl Fn(usize, usize, &Rope) + Sync) -> Result<()> {
        with_f32(&self.cos, |cos| {
            with_f32(&self.sin, |sin| {
                let rope = Rope {
                    cos,
                    sin,
                    half: self.head_dim / 2,
                };
                barrier_pool().execute_chunked(dims.b * self.n_kv, |range| {
                    for task_id in range {
                        task(task_id / self.n_kv, task_id % self.n_kv, &rope);
                    }
                });
            })
        })?
    }

    /// Probabilities `p[..=i]` of query `qr` (rotated, at position `i`) over the rotated keys.
    fn probs(&self, qr: &[f32], kr: &[f32], i: usize, p: &mut [f32]) {
        let d = self.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in p[..=i].iter_mut().enumerate() {
            *pj = scale * dot(qr, &kr[j * d..(j + 1) * d]);
            max = max.max(*pj);
        }
        let mut sum = 0f32;
        for pj in &mut p[..=i] {
            *pj = (*pj - max).exp();
            sum += *pj;
        }
        p[..=i].iter_mut().for_each(|pj| *pj /= sum);
    }

    /// The rotated keys of kv head `g` in sequence `bi`, `(t, head_dim)`.
    fn keys(&self, k: &[f32], dims: Dims, bi: usize, g: usize, rope: &Rope) -> Vec<f32> {
        let d = self.head_dim;
        let mut kr = vec![0f32; dims.t * d];
        for (j, out) in kr.chunks_exact_mut(d).enumerate() {
            let at = (bi * dims.t + j) * dims.kd + g * d;
            rope.rotate(&k[at..at + d], j, out);
        }
        kr
    }
}

/// The rotary tables: position `p` turns pair `(c, c + half)` by the angle of `cos[p, c]`.
struct Rope<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    half: usize,
}

impl Rope<'_> {
    fn rotate(&self, x: &[f32], pos: usize, out: &mut [f32]) {
        let h = self.half;
        for c in 0..h {
            let (co, si) = (self.cos[pos * h + c], self.sin[pos * h + c]);
            out[c] = x[c] * co - x[c + h] * si;
            out[c + h] = x[c + h] * co + x[c] * si;
        }
    }

    /// The gradient of `rotate`'s input from its output's: the inverse rotation.
    fn unrotate(&self, g: &[f32], pos: usize, out: &mut [f32]) {
        let h = self.half;
        for c in 0..h {
            let (co, si) = (self.cos[pos * h + c], self.sin[pos * h + c]);
            out[c] = g[c] * co + g[c + h] * si;
            out[c + h] = g[c + h] * co - g[c] * si;
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1, l2, l3)?;
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let (t, d, rep) = (dims.t, self.head_dim, self.n_heads / self.n_kv);
        let mut y = vec![0f32; q.len()];
        let out = Out(y.as_mut_ptr());
        self.each(dims, |bi, g, rope| {
            let kr = self.keys(k, dims, bi, g, rope);
            let (mut qr, mut p) = (vec![0f32; d], vec![0f32; t]);
            for h in g * rep..(g + 1) * rep {
                for i in 0..t {
                    let at = (bi * t + i) * dims.qd + h * d;
                    rope.rotate(&q[at..at + d], i, &mut qr);
                    self.probs(&qr, &kr, i, &mut p);
                    // SAFETY: row i, head h of sequence bi: this task's alone.
                    let yi = unsafe { out.part(at, d) };
                    for (j, pj) in p[..=i].iter().enumerate() {
                        let vj = (bi * t + j) * dims.kd + g * d;
                        axpy(*pj, &v[vj..vj + d], yi);
                    }
                }
            }
        })?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.cuda_dims(l1, l2, l3)?;
        crate::model::kernels::cuda::training_attention::forward(
            s1, l1, s2, l2, s3, l3, &self.cos, &self.sin, dims,
        )
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let dims = self.cuda_dims(q.layout(), k.layout(), v.layout())?;
            let (dq, dk, dv) = crate::model::kernels::cuda::training_attention::grads(
                q, k, v, dy, &self.cos, &self.sin, dims,
            )?;
            let keep = |g: Tensor, like: &Tensor| like.track_op().then_some(g);
            return Ok((keep(dq, q), keep(dk, k), keep(dv, v)));
        }
        let dims = self.dims(q.layout(), k.layout(), v.layout())?;
        let (t, d, rep) = (dims.t, self.head_dim, self.n_heads / self.n_kv);
        let scale = 1.0 / (d as f32).sqrt();
        let mut dq = vec![0f32; q.elem_count()];
        let mut dk = vec![0f32; k.elem_count()];
        let mut dv = vec![0f32; v.elem_count()];
        let (oq, ok, ov) = (
            Out(dq.as_mut_ptr()),
            Out(dk.as_mut_ptr()),
            Out(dv.as_mut_ptr()),
        );
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(dy, |dy| {
                        self.each(dims, |bi, g, rope| {
                            let kr = self.keys(k, dims, bi, g, rope);
                            let (mut dkr, mut dvg) = (vec![0f32; t * d], vec![0f32; t * d]);
                            let (mut qr, mut dqr) = (vec![0f32; d], vec![0f32; d]);
                            let (mut p, mut dp) = (vec![0f32; t], vec![0f32; t]);
                            for h in g * rep..(g + 1) * rep {
                                for i in 0..t {
                                    let at = (bi * t + i) * dims.qd + h * d;
                                    rope.rotate(&q[at..at + d], i, &mut qr);
                                    self.probs(&qr, &kr, i, &mut p);
                                    let dyi = &dy[at..at + d];
                                    // d(softmax): ds_j = p_j (dp_j - sum_j' p_j' dp_j').
                                    let mut s = 0f32;
                                    for j in 0..=i {
                                        let vj = (bi * t + j) * dims.kd + g * d;
                                        dp[j] = dot(dyi, &v[vj..vj + d]);
                                        s += p[j] * dp[j];
                                    }
                                    dqr.iter_mut().for_each(|x| *x = 0.0);
                                    for j in 0..=i {
                                        let ds = p[j] * (dp[j] - s) * scale;
                                        let rows = j * d..(j + 1) * d;
                                        axpy(ds, &kr[rows.clone()], &mut dqr);
                                        axpy(ds, &qr, &mut dkr[rows.clone()]);
                                        axpy(p[j], dyi, &mut dvg[rows]);
                                    }
                                    // SAFETY: row i, head h of sequence bi: this task's alone.
                                    rope.unrotate(&dqr, i, unsafe { oq.part(at, d) });
                                }
                            }
                            for j in 0..t {
                                let at = (bi * t + j) * dims.kd + g * d;
                                let rows = j * d..(j + 1) * d;
                                // SAFETY: kv head g of sequence bi: this task's alone.
                                rope.unrotate(&dkr[rows.clone()], j, unsafe { ok.part(at, d) });
                                unsafe { ov.part(at, d) }.copy_from_slice(&dvg[rows]);
                            }
                        })
                    })
                })
            })
        })?????;
        let grad = |g: Vec<f32>, like: &Tensor| -> Result<Option<Tensor>> {
            if like.track_op() {
                Ok(Some(Tensor::from_vec(g, like.shape(), like.device())?))
            } else {
                Ok(None)
            }
        };
        Ok((grad(dq, q)?, grad(dk, k)?, grad(dv, v)?))
    }
}

/// Causal attention over `q` `(b, t, n_heads * head_dim)` and `k`, `v`
/// `(b, t, n_kv * head_dim)` (f32 on the CPU; f32 or bf16 on a GPU, `cuda::training_attention`), the
/// projections' outputs before rotation; `cos` and `sin` are the `(positions, head_dim / 2)`
/// rotary tables. Returns `(b, t, n_heads * head_dim)`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    n_heads: usize,
    n_kv: usize,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let head_dim = 2 * cos.dim(1)?;
    if n_kv == 0 || !n_heads.is_multiple_of(n_kv) {
        candle_core::bail!("attention: {n_heads} heads over {n_kv} kv heads");
    }
    let op = Attention {
        n_heads,
        n_kv,
        head_dim,
        // The GPU kernels read the tables as f32 rows from their first element.
        cos: cos.to_dtype(candle_core::DType::F32)?.contiguous()?,
        sin: sin.to_dtype(candle_core::DType::F32)?.contiguous()?,
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}
