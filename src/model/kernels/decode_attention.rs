//! Attention of one new position per sequence over that sequence's own KV cache, on the CPU in
//! f32: what every decode step runs, once per layer for all its rows. Composed from candle
//! ops, each row cost about a dozen small ops per layer (views, a scale, two tiny matmuls,
//! a softmax, a concatenation), which made a batched step's time grow with its rows nearly as
//! fast as separate steps would. Here each (row, query head) is one task reading the cache
//! where it lies: scores, softmax and the weighted sum of values in one pass.
//!
//! A row's result depends on its own query and cache only, in a fixed order, so it is the
//! same bits alone or batched and on any thread count. Single-sequence decode uses it too, so
//! the one-sequence loop and the scheduler agree exactly.

use candle_core::{CpuStorage, DType, Device, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

/// Whether [`attend_rows`] serves `q` over the caches `kv` (else the composed candle path
/// runs): f32 on the CPU; with `--features cuda`, f32 or bf16 on a GPU (its own kernel,
/// `cuda::decode_attention`) where the longest cache fits the kernel.
pub fn applies(q: &Tensor, kv: &[(Tensor, Tensor)]) -> bool {
    if matches!(q.device(), Device::Cpu) {
        return q.dtype() == DType::F32;
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let longest = kv.iter().map(|(k, _)| k.dim(2).unwrap_or(usize::MAX)).max();
        return super::cuda::decode_attention::applies(q, longest.unwrap_or(0));
    }
    let _ = kv;
    false
}

/// A `(1, kv_heads, len, head_dim)` view into a cache buffer: element `(h, p, i)` lies at
/// `start + h * head_stride + p * pos_stride + i`.
struct KvView<'a> {
    data: &'a [f32],
    start: usize,
    head_stride: usize,
    pos_stride: usize,
    len: usize,
}

fn view<'a>(data: &'a [f32], l: &Layout, d: usize) -> Result<KvView<'a>> {
    let (dims, stride) = (l.shape().dims(), l.stride());
    if dims.len() != 4 || dims[0] != 1 || dims[3] != d || stride[3] != 1 {
        candle_core::bail!("decode attention: unexpected cache layout {dims:?} / {stride:?}");
    }
    Ok(KvView {
        data,
        start: l.start_offset(),
        head_stride: stride[1],
        pos_stride: stride[2],
        len: dims[2],
    })
}

fn cpu_f32(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => candle_core::bail!("decode attention: expected f32 CPU storage"),
    }
}

/// Dot product with eight independent sums (so it vectorises), summed as the q8 kernels sum
/// their lanes. (`fused::dot` sums its lanes in another order; merging the two would move one
/// path's rounding.)
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    super::quant::sum_lanes(acc) + tail
}

/// `q` is `(rows, heads, 1, head_dim)`; `kv[r]` is row `r`'s `(keys, values)`, each
/// `(1, kv_heads, len_r, head_dim)` (views into its cache). Query head `h` reads KV head
/// `h / (heads / kv_heads)`. Returns `(rows, heads, 1, head_dim)`.
pub fn attend_rows(q: &Tensor, kv: &[(Tensor, Tensor)], scale: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        return super::cuda::decode_attention::attend_rows(q, kv, scale);
    }
    let (rows, heads, t, d) = q.dims4()?;
    if t != 1 || rows != kv.len() {
        candle_core::bail!(
            "decode attention: {rows} rows of {t} positions, {} caches",
            kv.len()
        );
    }
    let q = q.contiguous()?;
    let qv = q.flatten_all()?.to_vec1::<f32>()?;
    let guards: Vec<_> = kv
        .iter()
        .map(|(k, v)| (k.storage_and_layout(), v.storage_and_layout()))
        .collect();
    let views = guards
        .iter()
        .map(|((ks, kl), (vs, vl))| Ok((view(cpu_f32(ks)?, kl, d)?, view(cpu_f32(vs)?, vl, d)?)))
        .collect::<Result<Vec<_>>>()?;
    let kv_heads = kv[0].0.dim(1)?;
    if kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("decode attention: {heads} query heads over {kv_heads} KV heads");
    }
    let group = heads / kv_heads;
    let scale = scale as f32;
    let mut out = vec![0f32; rows * heads * d];
    out.par_chunks_mut(d).enumerate().for_each(|(task, o)| {
        let (r, h) = (task / heads, task % heads);
        let (k, v) = &views[r];
        let kh = h / group;
        let query: Vec<f32> = qv[task * d..(task + 1) * d]
            .iter()
            .map(|x| x * scale)
            .collect();
        fn at<'a>(view: &KvView<'a>, kh: usize, p: usize, d: usize) -> &'a [f32] {
            let s = view.start + kh * view.head_stride + p * view.pos_stride;
            &view.data[s..s + d]
        }
        let scores: Vec<f32> = (0..k.len).map(|p| dot(&query, at(k, kh, p, d))).collect();
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0f32;
        for (p, s) in scores.iter().enumerate() {
            let e = (s - max).exp();
            sum += e;
            super::fused::axpy(e, at(v, kh, p, d), o);
        }
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|x| *x *= inv);
    });
    drop(guards);
    Tensor::from_vec(out, (rows, heads, 1, d), q.device())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The textbook formula with candle ops: KV heads repeated, softmax(q k^T * scale) v.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let group = q.dim(1).unwrap() / k.dim(1).unwrap();
        let rep = |t: &Tensor| {
            let (b, h, l, d) = t.dims4().unwrap();
            t.unsqueeze(2)
                .unwrap()
                .expand((b, h, group, l, d))
                .unwrap()
                .reshape((b, h * group, l, d))
                .unwrap()
        };
        let s = (q.matmul(&rep(k).t().unwrap()).unwrap() * scale).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&s.contiguous().unwrap()).unwrap();
        p.matmul(&rep(v).contiguous().unwrap()).unwrap()
    }

    #[test]
    fn rows_of_different_lengths_match_the_formula_and_read_only_their_cached_positions() {
        let (heads, kv_heads, d) = (6, 2, 20);
        let q = randn(&[3, heads, 1, d], 1);
        // Views into roomy buffers (as the cache holds them): positions past `len` are garbage
        // that must never be read.
        let kv: Vec<(Tensor, Tensor)> = [5usize, 1, 13]
            .iter()
            .enumerate()
            .map(|(r, &len)| {
                let k = randn(&[1, kv_heads, 16, d], 10 + r as u64);
                let v = randn(&[1, kv_heads, 16, d], 20 + r as u64);
                (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap())
            })
            .collect();
        let scale = 1.0 / (d as f64).sqrt();
        let got = attend_rows(&q, &kv, scale).unwrap();
        assert_eq!(got.dims(), &[3, heads, 1, d]);
        for (r, (k, v)) in kv.iter().enumerate() {
            let want = reference(&q.narrow(0, r, 1).unwrap(), k, v, scale);
            let diff = (got.narrow(0, r, 1).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "row {r}: {diff}");
            // Alone: the same bits as in the batch.
            let alone = attend_rows(&q.narrow(0, r, 1).unwrap(), &kv[r..r + 1], scale).unwrap();
            let a: Vec<f32> = alone.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = got
                .narrow(0, r, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "row {r} alone");
        }
        assert!(
            attend_rows(&q, &kv[..2], scale).is_err(),
            "rows and caches must pair up"
        );
    }
}
