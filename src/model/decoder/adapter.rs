//! What a request may add to the shared weights: an adapter's delta on named projections, and
//! one adapter per row of a batch.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{Result, Tensor};

/// The linear projections an adapter can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];
}

/// A per-request additive change to some projections (e.g. LoRA): `y = W x + delta(x)`.
/// The base weights stay shared and untouched.
pub trait Adapter: Sync {
    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>>;

    /// The delta as `scale * B A x` factors, where it is one (a LoRA outside training):
    /// [`PerRow`] then gathers the rows' factors into two batched products.
    fn low_rank(&self, _layer: usize, _target: Target) -> Option<LowRank<'_>> {
        None
    }

    /// Whether every delta this adapter adds is its [`low_rank`](Self::low_rank) factors'
    /// (and it adds none where it has none): stacked factors then stand for it entirely, so a
    /// captured step that reads stacks can serve it once its factors are copied in.
    fn is_low_rank(&self) -> bool {
        false
    }

    /// The delta on `x` as factors a kernel can add to a projection's output in one launch:
    /// one pair for every row (a single LoRA), or a pair per row (a gathered batch). `None`
    /// where the delta is not low-rank.
    fn row_factors(&self, layer: usize, target: Target, _x: &Tensor) -> Result<Option<RowFactors>> {
        Ok(self.low_rank(layer, target).map(|l| RowFactors::Shared {
            a: l.a.clone(),
            b: l.b.clone(),
            scale: l.scale,
        }))
    }

    /// A training step begins (`Some(seed)`, e.g. for dropout masks) or training is over
    /// (`None`: inference behaviour).
    fn begin_step(&self, _step: Option<u64>) {}
}

/// A low-rank delta `scale * B (A x)`: `a` is `(rank, in)`, `b` `(out, rank)`. `id` names the
/// adapter instance and is never reused, so copies of its factors can be cached by it.
pub struct LowRank<'a> {
    pub id: u64,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

/// A low-rank delta's factors for every row of a pass (see [`Adapter::row_factors`]).
pub enum RowFactors {
    /// `a` `(rank, in)` and `b` `(out, rank)`, scaled by `scale`, for every row.
    Shared { a: Tensor, b: Tensor, scale: f64 },
    /// `a` `(rows, rank, in)`, `b` `(rows, out, rank)` and `scales` `(rows,)` f32: row `i`'s
    /// own pair (scale 0 for a row without adapter).
    Stacked {
        a: Tensor,
        b: Tensor,
        scales: Tensor,
    },
}

impl RowFactors {
    /// `(a, b, scales, scale)`: the per-row scales where there are some, else the one scale.
    pub fn parts(&self) -> (&Tensor, &Tensor, Option<&Tensor>, f64) {
        match self {
            Self::Shared { a, b, scale } => (a, b, None, *scale),
            Self::Stacked { a, b, scales } => (a, b, Some(scales), 0.0),
        }
    }
}

/// Adapters of a batch, one per row (`None`: the base model): each row's delta is computed
/// from that row alone, so no row's adapter touches another row; no weights are merged.
/// Where every row's delta is low-rank with factors of one shape, the rows' factors are
/// stacked and the deltas are two batched products for the whole batch (as S-LoRA's and
/// Punica's gathered kernels do), instead of products per row; otherwise each row is
/// computed alone.
pub struct PerRow<'a> {
    rows: Vec<Option<&'a dyn Adapter>>,
    gather: bool,
    gathered: Option<&'a Gathered>,
}

/// Rows' stacked low-rank factors per projection, kept across decode steps by whoever owns
/// the batch: an entry is used only while the very same adapters sit in the very same rows.
#[derive(Default)]
pub struct Gathered(Mutex<HashMap<(usize, Target), Stacked>>);

impl Gathered {
    /// Projections with stacked factors held.
    pub fn entries(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Drops every entry (the batch has no adapters left).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Whether [`restack`](Self::restack) can serve `rows` over `layers` layers: every row's
    /// adapter is purely low-rank, and each of its factor pairs has a stack of its shape, with
    /// a place for every row.
    pub fn restackable(&self, rows: &[Option<&dyn Adapter>], layers: usize) -> bool {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        rows.iter().flatten().all(|a| {
            a.is_low_rank()
                && (0..layers).all(|l| {
                    Target::ALL.iter().all(|&t| match a.low_rank(l, t) {
                        None => true,
                        Some(f) => map.get(&(l, t)).is_some_and(|st| {
                            st.key.len() == rows.len()
                                && st.a.dims()[1..] == *f.a.dims()
                                && st.b.dims()[1..] == *f.b.dims()
                                && st.a.dtype() == f.a.dtype()
                                && st.b.dtype() == f.b.dtype()
                        }),
                    })
                })
        })
    }

    /// Rewrites every held stack in place for `rows` (row `i` in place `i`), so that whatever
    /// reads their buffers (a captured decode step) computes these rows' deltas: a row whose
    /// adapter changed gets its factors copied in, a row without factors there gets scale 0
    /// (its place keeps old factors, valid memory multiplied by nothing). Copies only what
    /// changed: a row that joins costs its own factors, one that leaves nothing but scales.
    /// Refused, with nothing written, where [`restackable`](Self::restackable) says no.
    pub fn restack(&self, rows: &[Option<&dyn Adapter>], layers: usize) -> Result<()> {
        if !self.restack_if_fits(rows, layers)? {
            candle_core::bail!("restack: these rows' adapters do not fit the held stacks");
        }
        Ok(())
    }

    /// [`restack`](Self::restack) where the rows fit; `false`, with nothing written, where
    /// they do not: one check for both.
    pub fn restack_if_fits(&self, rows: &[Option<&dyn Adapter>], layers: usize) -> Result<bool> {
        if !self.restackable(rows, layers) {
            return Ok(false);
        }
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Every copy is gathered first and made at once (one launch on a GPU); the new scales
        // go up to the device in one upload and are copied from there.
        let mut copies: Vec<(Tensor, Tensor, usize)> = Vec::new();
        let mut scaled: Vec<(Tensor, Tensor)> = Vec::new();
        let mut staged: Vec<f32> = Vec::new();
        for (&(layer, target), st) in map.iter_mut() {
            let factors: Vec<Option<LowRank>> = rows
                .iter()
                .map(|r| r.and_then(|a| a.low_rank(layer, target)))
                .collect();
            let key: Vec<Option<u64>> = factors.iter().map(|f| f.as_ref().map(|f| f.id)).collect();
            if key == st.key {
                continue;
            }
            for (i, f) in factors.iter().enumerate() {
                if let Some(f) = f.as_ref().filter(|f| st.key[i] != Some(f.id)) {
                    let (a, b) = (f.a.contiguous()?, f.b.contiguous()?);
                    let (an, bn) = (a.elem_count(), b.elem_count());
                    copies.push((a, st.a.clone(), i * an));
                    copies.push((b, st.b.clone(), i * bn));
                }
            }
            let host: Vec<f32> = factors
                .iter()
                .map(|f| f.as_ref().map_or(0.0, |f| f.scale as f32))
                .collect();
            if host != st.host_scales {
                scaled.push((st.scales.clone(), st.scale.clone()));
                staged.extend(&host);
                st.host_scales = host;
            }
            st.key = key;
        }
        if let Some((first, _)) = scaled.first() {
            let n = rows.len();
            let up = Tensor::from_vec(staged, scaled.len() * n, first.device())?;
            let mut as_dtype: Vec<(candle_core::DType, Tensor)> = Vec::new();
            for (i, (scales, scale)) in scaled.into_iter().enumerate() {
                let src = up.narrow(0, i * n, n)?;
                let dt = scale.dtype();
                let cast = match as_dtype.iter().find(|(d, _)| *d == dt) {
                    Some((_, t)) => t.clone(),
                    None => {
                        let t = up.to_dtype(dt)?;
                        as_dtype.push((dt, t.clone()));
                        t
                    }
                };
                copies.push((src, scales, 0));
                copies.push((cast.narrow(0, i * n, n)?, scale, 0));
            }
        }
        copy_all(&copies)?;
        Ok(true)
    }
}

/// Makes every `(src, dst, at)` copy: all of `src` into `dst` from its element `at` on. On a
/// GPU with the project's kernels, one launch for all (`cuda::lora::copy_into`); elsewhere a
/// `slice_set` each.
fn copy_all(copies: &[(Tensor, Tensor, usize)]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if copies.first().is_some_and(|(s, _, _)| s.device().is_cuda())
        && crate::model::kernels::cuda::enabled()
    {
        return crate::model::kernels::cuda::lora::copy_into(copies);
    }
    for (src, dst, at) in copies {
        dst.flatten_all()?.slice_set(&src.flatten_all()?, 0, *at)?;
    }
    Ok(())
}

/// One projection's factors for a batch: `a` `(rows, rank, in)`, `b` `(rows, out, rank)` and
/// `scale` `(rows, 1, 1)` in the activations' dtype (0 for a row without adapter; `scales`
/// the same in f32, `(rows,)`), built for the adapter ids `key`.
#[derive(Clone)]
struct Stacked {
    key: Vec<Option<u64>>,
    a: Tensor,
    b: Tensor,
    scale: Tensor,
    scales: Tensor,
    /// `scales` on the host.
    host_scales: Vec<f32>,
}

impl<'a> PerRow<'a> {
    pub fn new(rows: Vec<Option<&'a dyn Adapter>>) -> Self {
        Self {
            rows,
            gather: true,
            gathered: None,
        }
    }

    /// With stacked factors kept in `cache` from one step to the next.
    pub fn with_cache(rows: Vec<Option<&'a dyn Adapter>>, cache: &'a Gathered) -> Self {
        Self {
            rows,
            gather: true,
            gathered: Some(cache),
        }
    }

    /// Every row's delta computed alone, never gathered: the reference the gathered products
    /// are measured against (`ttarag bench --batch --lora`).
    pub fn each_alone(rows: Vec<Option<&'a dyn Adapter>>) -> Self {
        Self {
            rows,
            gather: false,
            gathered: None,
        }
    }

    /// The batch's deltas as two batched products, or `None` where some row's delta is not
    /// low-rank or the factors' shapes differ.
    fn gathered_delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(st) = self.stacked(layer, target, x)? else {
            return Ok(None);
        };
        let h = x.matmul(&st.a.transpose(1, 2)?)?;
        let y = h.matmul(&st.b.transpose(1, 2)?)?;
        Ok(Some(y.broadcast_mul(&st.scale)?))
    }

    /// The rows' factors stacked (from the cache where it holds them for these very adapters),
    /// or `None` where some row's delta is not low-rank or the factors' shapes differ.
    fn stacked(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Stacked>> {
        let mut factors = Vec::with_capacity(self.rows.len());
        for a in &self.rows {
            factors.push(match a {
                Some(a) => match a.low_rank(layer, target) {
                    Some(f) => Some(f),
                    None => return Ok(None),
                },
                None => None,
            });
        }
        let Some(first) = factors.iter().flatten().next() else {
            return Ok(None);
        };
        let same = |f: &LowRank| f.a.dims() == first.a.dims() && f.b.dims() == first.b.dims();
        if !factors.iter().flatten().all(same) {
            return Ok(None);
        }
        let key: Vec<Option<u64>> = factors.iter().map(|f| f.as_ref().map(|f| f.id)).collect();
        let build = || -> Result<Stacked> {
            // A row without adapter multiplies some other row's factors by 0.
            let pick = |f: &Option<LowRank<'_>>| f.as_ref().unwrap_or(first).a.clone();
            let a = Tensor::stack(&factors.iter().map(pick).collect::<Vec<_>>(), 0)?;
            let pick = |f: &Option<LowRank<'_>>| f.as_ref().unwrap_or(first).b.clone();
            let b = Tensor::stack(&factors.iter().map(pick).collect::<Vec<_>>(), 0)?;
            let s: Vec<f32> = factors
                .iter()
                .map(|f| f.as_ref().map_or(0.0, |f| f.scale as f32))
                .collect();
            let scales = Tensor::from_vec(s.clone(), factors.len(), x.device())?;
            Ok(Stacked {
                key: key.clone(),
                a,
                b,
                scale: scales.reshape((factors.len(), 1, 1))?.to_dtype(x.dtype())?,
                scales,
                host_scales: s,
            })
        };
        let st = match self.gathered {
            Some(cache) => {
                let mut map = cache.0.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&(layer, target)) {
                    Some(st) if st.key == key => st.clone(),
                    _ => {
                        let st = build()?;
                        map.insert((layer, target), st.clone());
                        st
                    }
                }
            }
            None => build()?,
        };
        Ok(Some(st))
    }
}

impl Adapter for PerRow<'_> {
    fn row_factors(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<RowFactors>> {
        if !self.gather || x.dim(0)? != self.rows.len() {
            return Ok(None);
        }
        Ok(self
            .stacked(layer, target, x)?
            .map(|st| RowFactors::Stacked {
                a: st.a,
                b: st.b,
                scales: st.scales,
            }))
    }

    fn delta(&self, layer: usize, target: Target, x: &Tensor) -> Result<Option<Tensor>> {
        let rows = x.dim(0)?;
        if rows != self.rows.len() {
            candle_core::bail!("{} adapters for a batch of {rows} rows", self.rows.len());
        }
        if rows > 1 && self.gather {
            if let Some(d) = self.gathered_delta(layer, target, x)? {
                return Ok(Some(d));
            }
        }
        let mut deltas = Vec::with_capacity(rows);
        for (i, a) in self.rows.iter().enumerate() {
            deltas.push(match a {
                Some(a) => a.delta(layer, target, &x.narrow(0, i, 1)?)?,
                None => None,
            });
        }
        let Some(shape) = deltas.iter().flatten().next().map(|d| d.shape().clone()) else {
            return Ok(None);
        };
        let zeros = Tensor::zeros(shape, x.dtype(), x.device())?;
        let rows: Vec<Tensor> = deltas
            .into_iter()
            .map(|d| d.unwrap_or_else(|| zeros.clone()))
            .collect();
        Ok(Some(Tensor::cat(&rows, 0)?))
    }

    fn begin_step(&self, step: Option<u64>) {
        for a in self.rows.iter().flatten() {
            a.begin_step(step);
        }
    }
}
