//! A LoRA delta added to a projection's output in one launch (`lora.cu`): the rows of a decode
//! step, each row with its own adapter (gathered, BGMV-style) or all with one, and every
//! position of a prefill chunk or a loss pass with one. The composed reference is two
//! products, a scale and an add (`Adapter::delta`), four launches or more per projection.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::abi::{self, Addr};
use super::{cuda_device, function, held_view, with_addresses};
use crate::model::kernels::fused::LORA_MAX_RANK as MAX_RANK;
use crate::model::kernels::rows::even_rows;

/// Whether an inference pass's `x` (`(batch, t, in)`) may take the kernel. Any number of
/// rows: each is a block of its own, whose work (`rank x (in + outs)` products, the factors
/// read from cache) is small next to a launch, so a prefill chunk of 512 positions is one
/// launch where the composed delta is four or more.
pub fn applies(x: &Tensor) -> bool {
    super::enabled() && x.device().is_cuda() && matches!(x.dtype(), DType::F32 | DType::BF16)
}

/// `y + scale B (A x)` for each row of `x` (`(batch, t, in)`), or `None` where the kernel does
/// not take the factors (rank above 64, another dtype, or per-row factors for other than one
/// position per row). `a` `(rank, in)` and `b` `(out, rank)` serve every row with `scale`;
/// with `scales` (`(batch,)`), `a` `(batch, rank, in)` and `b` `(batch, out, rank)` hold a
/// factor pair per row.
pub fn add(
    y: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scales: Option<&Tensor>,
    scale: f64,
) -> Result<Option<Tensor>> {
    let dims = x.dims();
    let (inp, rows) = (
        dims[dims.len() - 1],
        x.elem_count() / dims[dims.len() - 1].max(1),
    );
    let outs = y.dims().last().copied().unwrap_or(0);
    let (per_row, scale) = (scales.is_some(), scale as f32);
    let rank = a.dims().iter().rev().nth(1).copied().unwrap_or(0);
    let shapes_fit = if per_row {
        a.dims() == [rows, rank, inp]
            && b.dims() == [rows, outs, rank]
            && dims.len() == 3
            && dims[1] == 1
    } else {
        a.dims() == [rank, inp] && b.dims() == [outs, rank]
    };
    if !shapes_fit
        || rank == 0
        || rank > MAX_RANK
        || a.dtype() != x.dtype()
        || b.dtype() != x.dtype()
    {
        return Ok(None);
    }
    let op = LoraAdd {
        a: a.contiguous()?,
        b: b.contiguous()?,
        scales: scales
            .map(|s| s.to_dtype(DType::F32)?.contiguous())
            .transpose()?,
        scale,
        stride: if per_row {
            (rank * inp, outs * rank)
        } else {
            (0, 0)
        },
        rank,
    };
    // A part of a joint product is read where it lies; other layouts are copied first.
    let y = match even_rows(y.dims(), y.stride()) {
        Some(_) => y.clone(),
        None => y.contiguous()?,
    };
    Ok(Some(y.apply_op2_no_bwd(&x.contiguous()?, &op)?))
}

/// Copies every `(src, dst, at)`: all of `src` into `dst` from its element `at` on, both
/// contiguous and of one dtype, on one GPU, in one launch (`lora_restack`): a step graph's
/// stacks take a joining row's factors for every projection at once. The reference is a
/// `slice_set` per copy.
pub fn copy_into(copies: &[(Tensor, Tensor, usize)]) -> Result<()> {
    let Some((first, _, _)) = copies.first() else {
        return Ok(());
    };
    for (src, dst, at) in copies {
        if !src.is_contiguous()
            || !dst.is_contiguous()
            || src.dtype() != dst.dtype()
            || at + src.elem_count() > dst.elem_count()
        {
            candle_core::bail!(
                "lora restack: {:?} {:?} into {:?} {:?} at {at}",
                src.dims(),
                src.dtype(),
                dst.dims(),
                dst.dtype()
            );
        }
    }
    let dev = cuda_device(first, "lora restack")?.clone();
    let stream = dev.cuda_stream();
    let operands: Vec<&Tensor> = copies.iter().flat_map(|(s, d, _)| [s, d]).collect();
    with_addresses(&stream, &operands, |a| {
        let mut spans = Vec::with_capacity(copies.len() * 3);
        for (i, (src, _, at)) in copies.iter().enumerate() {
            let size = src.dtype().size_in_bytes();
            spans.extend([
                a[2 * i],
                a[2 * i + 1] + (at * size) as i64,
                (src.elem_count() * size) as i64,
            ]);
        }
        let table = Tensor::from_vec(spans, (copies.len(), 3), first.device())?;
        with_addresses(&stream, &[&table], |t| {
            let f = function(&dev, &abi::lora_restack::DECL, DType::F32)?;
            let mut bl = f.builder();
            let (tab, n) = (Addr(t[0] as u64), copies.len() as i32);
            abi::lora_restack::push(&mut bl, &tab, &n);
            // SAFETY: one block per span, each copying its bytes between live, contiguous
            // buffers held by `copies` (alive until the launch is queued, ordered by the
            // stream after it), the destination range checked to lie within its tensor.
            unsafe { bl.launch(abi::grid::lora_restack(copies.len()).into()) }
                .map_err(candle_core::Error::wrap)?;
            Ok(())
        })
    })
}

struct LoraAdd {
    a: Tensor,
    b: Tensor,
    scales: Option<Tensor>,
    scale: f32,
    /// Elements from one row's A (and B) to the next; 0 when every row shares one.
    stride: (usize, usize),
    rank: usize,
}

impl LoraAdd {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        x: &CudaStorage,
        lx: &Layout,
    ) -> Result<CudaStorage> {
        let dev = &y.device;
        let Some((x0, x1)) = lx.contiguous_offsets() else {
            candle_core::bail!("lora-add: a contiguous input only");
        };
        let outs = ly.shape().dims().last().copied().unwrap_or(1);
        let inp = lx.shape().dims().last().copied().unwrap_or(1);
        let rows = ly.shape().elem_count() / outs.max(1);
        let Some(y_stride) = even_rows(ly.dims(), ly.stride()) else {
            candle_core::bail!("lora-add: rows of {:?} do not lie evenly", ly.dims());
        };
        let y_stride = y_stride as i64;
        let yv = y.as_cuda_slice::<T>()?.slice(ly.start_offset()..);
        let xv = x.as_cuda_slice::<T>()?.slice(x0..x1);
        let (a_s, a_l) = self.a.storage_and_layout();
        let (b_s, b_l) = self.b.storage_and_layout();
        let av = held_view::<T>(&a_s, a_l, "lora-add")?;
        let bv = held_view::<T>(&b_s, b_l, "lora-add")?;
        let scales = self.scales.as_ref().map(|s| s.storage_and_layout());
        let sv = match &scales {
            Some((s, l)) => Some(held_view::<f32>(s, l, "lora-add")?),
            None => None,
        };
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(rows * outs) }?;
        let f = function(dev, &abi::lora_add::DECL, T::DTYPE)?;
        let mut bl = f.builder();
        let (in32, out32, r32) = (inp as i32, outs as i32, self.rank as i32);
        let (sa, sb) = (self.stride.0 as i64, self.stride.1 as i64);
        abi::lora_add::push(
            &mut bl,
            &yv,
            &xv,
            &av,
            &bv,
            &sv,
            &self.scale,
            &mut out,
            &in32,
            &out32,
            &r32,
            &sa,
            &sb,
            &y_stride,
        );
        let cfg = abi::grid::lora_add(rows).into();
        if rows > 0 {
            // SAFETY: one block per row; each reads its row of x and y, its adapter's A
            // (rank x in) and B (out x rank) at the given strides (checked against the
            // factors' shapes by `add`), its scale, and writes its row of the output.
            unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp2 for LoraAdd {
    fn name(&self) -> &'static str {
        "cuda-lora-add"
    }

    super::cuda_only!(2);

    fn cuda_fwd(
        &self,
        y: &CudaStorage,
        ly: &Layout,
        x: &CudaStorage,
        lx: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = match y.dtype() {
            DType::F32 => self.launch::<f32>(y, ly, x, lx)?,
            DType::BF16 => self.launch::<half::bf16>(y, ly, x, lx)?,
            d => candle_core::bail!("lora-add: {d:?} operands"),
        };
        Ok((out, ly.shape().clone()))
    }
}
