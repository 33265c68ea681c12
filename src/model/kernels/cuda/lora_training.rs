//! A LoRA delta `scale B (A x)` in adaptation on the GPU, the CUDA body of
//! `fused::lora_delta`: forward in one launch (`lora.cu`'s kernel, adding to nothing),
//! backward in two (`lora_training.cu`: a rows pass for dx, a columns pass for dA and dB). Its
//! CPU body is the reference; `ttarag bench --kernels` compares this one with candle's
//! composed delta on the GPU. It runs where `[model] cuda_fused_training` is on.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};

use super::abi::{self, Addr};
use super::{contiguous_view, function, held_view};

const WHAT: &str = "lora delta";

/// `(rows, in, outs, rank)`: rows of `x` `(.., in)`, `a` `(rank, in)`, `b` `(outs, rank)`, as
/// `fused::lora_delta` checked them.
pub type Dims = (usize, usize, usize, usize);

/// The delta of each row of `x`: the forward of `fused::lora_delta`, `(rows, outs)` flat.
#[allow(clippy::too_many_arguments)]
pub fn delta(
    x: &CudaStorage,
    lx: &Layout,
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    scale: f32,
    dims: Dims,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => delta_of::<f32>(x, lx, a, la, b, lb, scale, dims),
        DType::BF16 => delta_of::<half::bf16>(x, lx, a, la, b, lb, scale, dims),
        d => candle_core::bail!("{WHAT}: {d:?} operands"),
    }
}

#[allow(clippy::too_many_arguments)]
fn delta_of<T: CudaDType + DeviceRepr + WithDType>(
    x: &CudaStorage,
    lx: &Layout,
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    scale: f32,
    (rows, inp, outs, rank): Dims,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let (xv, av, bv) = (
        contiguous_view::<T>(x, lx, WHAT)?,
        contiguous_view::<T>(a, la, WHAT)?,
        contiguous_view::<T>(b, lb, WHAT)?,
    );
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<T>(rows * outs) }?;
    if rows > 0 {
        let f = function(dev, &abi::lora_add::DECL, T::DTYPE)?;
        let mut bl = f.builder();
        // No `y` (the delta alone), no per-row scales, one adapter for every row.
        let none = 0i64;
        let (in32, out32, r32) = (inp as i32, outs as i32, rank as i32);
        abi::lora_add::push(
            &mut bl,
            &Addr::NULL,
            &xv,
            &av,
            &bv,
            &Addr::NULL,
            &scale,
            &mut out,
            &in32,
            &out32,
            &r32,
            &none,
            &none,
            &none,
        );
        let cfg = abi::grid::lora_add(rows).into();
        // SAFETY: one block per row reads its row of x, all of A and B, and writes its row.
        unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The gradients of `fused::lora_delta(x, a, b, scale)` for the output gradient `g`:
/// `(dx, da, db)`, shaped as `x`, `a` and `b`.
pub fn grads(
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    g: &Tensor,
    scale: f32,
    dims: Dims,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (nx, na, nb) = (x.elem_count(), a.elem_count(), b.elem_count());
    let op = Grads {
        a: a.contiguous()?,
        b: b.contiguous()?,
        scale,
        dims,
    };
    let all = x
        .contiguous()?
        .apply_op2_no_bwd(&g.to_dtype(x.dtype())?.contiguous()?, &op)?;
    Ok((
        all.narrow(0, 0, nx)?.reshape(x.shape())?,
        all.narrow(0, nx, na)?.reshape(a.shape())?,
        all.narrow(0, nx + na, nb)?.reshape(b.shape())?,
    ))
}

/// `[dx | dA | dB]` flat, from `x` and `g` (the op's operands) and the factors it holds.
struct Grads {
    a: Tensor,
    b: Tensor,
    scale: f32,
    dims: Dims,
}

impl CustomOp2 for Grads {
    fn name(&self) -> &'static str {
        "cuda-lora-delta-grads"
    }

    super::cuda_only!(2);

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let out = match x.dtype() {
            DType::F32 => self.launch::<f32>(x, lx, g, lg)?,
            DType::BF16 => self.launch::<half::bf16>(x, lx, g, lg)?,
            d => candle_core::bail!("{WHAT} grads: {d:?} operands"),
        };
        let len = lx.shape().elem_count() + self.a.elem_count() + self.b.elem_count();
        Ok((out, Shape::from(len)))
    }
}

impl Grads {
    fn launch<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        x: &CudaStorage,
        lx: &Layout,
        g: &CudaStorage,
        lg: &Layout,
    ) -> Result<CudaStorage> {
        let dev = &x.device;
        let (rows, inp, outs, rank) = self.dims;
        let (xv, gv) = (
            contiguous_view::<T>(x, lx, WHAT)?,
            contiguous_view::<T>(g, lg, WHAT)?,
        );
        let ((a_s, a_l), (b_s, b_l)) = (self.a.storage_and_layout(), self.b.storage_and_layout());
        let av = held_view::<T>(&a_s, a_l, WHAT)?;
        let bv = held_view::<T>(&b_s, b_l, WHAT)?;
        let (nx, na, nb) = (rows * inp, rank * inp, outs * rank);
        // SAFETY: the rows pass writes every element of h, dh and dx, the columns pass every
        // element of dA and dB.
        let (mut h, mut dh, mut out) = unsafe {
            (
                dev.alloc::<f32>((rows * rank).max(1))?,
                dev.alloc::<f32>((rows * rank).max(1))?,
                dev.alloc::<T>(nx + na + nb)?,
            )
        };
        let (in32, out32, r32, rows64) = (inp as i32, outs as i32, rank as i32, rows as i64);
        {
            let (mut dx, mut rest) = out.split_at_mut(nx);
            if rows > 0 {
                let f = function(dev, &abi::lora_bwd_rows::DECL, T::DTYPE)?;
                let mut bl = f.builder();
                abi::lora_bwd_rows::push(
                    &mut bl,
                    &xv,
                    &av,
                    &bv,
                    &gv,
                    &self.scale,
                    &mut h,
                    &mut dh,
                    &mut dx,
                    &in32,
                    &out32,
                    &r32,
                );
                let cfg = abi::grid::lora_bwd_rows(rows).into();
                // SAFETY: one block per row reads its rows of x and g, all of A and B, and
                // writes its rows of h, dh and dx.
                unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
            }
            let (mut da, mut db) = rest.split_at_mut(na);
            let f = function(dev, &abi::lora_bwd_cols::DECL, T::DTYPE)?;
            let mut bl = f.builder();
            abi::lora_bwd_cols::push(
                &mut bl,
                &xv,
                &gv,
                &h,
                &dh,
                &self.scale,
                &mut da,
                &mut db,
                &rows64,
                &in32,
                &out32,
                &r32,
            );
            let cfg = abi::grid::lora_bwd_cols(na + nb).into();
            // SAFETY: a thread per element of dA and dB reads a column of x or g and of dh
            // or h over every row, and writes its element.
            unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
