//! The CUDA body of the greedy pick (`greedy.cu`): one block per row of logits, two f64 out
//! per row. The CPU body (`model/kernels/greedy.rs`) is the reference; `ttarag bench --kernels`
//! compares them on the GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Result, WithDType};

use super::{abi, contiguous_view, function};

/// `(rows, 2)` f64: each row's token and log-probability, from contiguous `(rows, vocab)`
/// logits.
pub fn picks(s: &CudaStorage, l: &Layout, rows: usize, vocab: usize) -> Result<CudaStorage> {
    match s.dtype() {
        DType::F32 => launch::<f32>(s, l, rows, vocab),
        DType::BF16 => launch::<half::bf16>(s, l, rows, vocab),
        d => candle_core::bail!("greedy pick: {d:?} logits"),
    }
}

fn launch<T: CudaDType + DeviceRepr + WithDType>(
    s: &CudaStorage,
    l: &Layout,
    rows: usize,
    vocab: usize,
) -> Result<CudaStorage> {
    let dev = &s.device;
    let xv = contiguous_view::<T>(s, l, "greedy pick")?;
    // SAFETY: one block per row writes both of its elements.
    let mut out = unsafe { dev.alloc::<f64>(2 * rows) }?;
    if rows > 0 {
        let f = function(dev, &abi::greedy_pick::DECL, T::DTYPE)?;
        let mut bl = f.builder();
        let v64 = vocab as i64;
        abi::greedy_pick::push(&mut bl, &xv, &v64, &mut out);
        let cfg = abi::grid::greedy_pick(rows).into();
        // SAFETY: block r reads row r's `vocab` contiguous logits and writes out[2r..2r+2].
        unsafe { bl.launch(cfg) }.map_err(candle_core::Error::wrap)?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
