//! The project's own CUDA kernels (`--features cuda`), compiled to PTX by `build.rs` and
//! loaded into candle's device on first use. They run on candle's one stream per device, so
//! they are ordered with every candle op without events of their own. A launch loads its entry
//! point by declaration (`function`), pushes its arguments through the declaration's `push`
//! and launches with its shape from `cuda_abi::grid` (`model/kernels/cuda_abi/`), as the
//! CPU-run tests do, which check the declarations against the source.
//!
//! | kernel | serves | used when | tested against |
//! |---|---|---|---|
//! | [`optimizer`] (`optimizer.cu`) | adaptation's optimiser step: global-norm clipping and AdamW over every trained tensor in three launches, moments in f32 | trained variables on a CUDA device, f32 or bf16 | candle_nn::AdamW with the gradients clipped on the host, step for step (`ttarag bench --kernels`) |
//! | [`decode_attention`] (`decode_attention.cu`) | a decode step's attention: every row and query head in one launch, each row over its own cache in place; and its new keys and values written at positions read on the device (`kv_write`) | decode steps on a CUDA device, f32 or bf16, caches of at most ~12k positions | the composed candle ops (`ttarag bench --kernels`) |
//! | [`decode_step`] (`decode_step.cu`) | a decode step's small neighbouring ops fused: rotary embedding with the cache write (q, k, v read where the projection left them, each part's LoRA delta added there), the residual add with the next RMS norm, SwiGLU read from the joint gate/up product | inference passes on a CUDA device, f32 or bf16 (the cache write: steps on device positions, `Decoder::device_step`) | the composed candle ops (`ttarag bench --kernels`) |
//! | [`graph`] | a decode step captured once as a CUDA graph and replayed per token (`StepGraph`) | decode steps on a CUDA device, `[model] cuda_graphs` | the same step launched op by op (`ttarag bench --kernels`, `--query`) |
//! | [`greedy`] (`greedy.cu`) | a step's greedy token and its log-probability per row, two f64 to the host instead of each row's logits | greedy rows (temperature 0) of a step on a CUDA device, f32 or bf16 logits | the CPU body, the host formula (`ttarag bench --kernels`) |
//! | [`lora`] (`lora.cu`) | a LoRA delta added to a projection's output in one launch, each row with its own adapter (gathered) or all with one | inference passes on a CUDA device (decode steps, prefill chunks, loss passes), rank at most 64 | the composed delta, two products, a scale and an add (`ttarag bench --kernels`) |
//! | [`lora_training`] (`lora_training.cu`, and `lora.cu` forward) | adaptation's LoRA delta, the CUDA body of `fused::lora_delta`: one launch forward, two backward (dx by rows; dA, dB by columns), in a fixed order | adaptation on a CUDA device, f32 or bf16, rank at most 64, with `[model] cuda_fused_training` | candle's composed delta, values and gradients (`ttarag bench --kernels`) |
//! | [`training_attention`] (`training_attention.cu`) | adaptation's causal attention with rotary embedding, the CUDA body of `fused::causal_attention`: two launches forward, three backward, in a fixed order (no atomics) | adaptation's f32 and bf16 blocks on a CUDA device with `[model] cuda_fused_training` | candle's composed rotary and attention, values and gradients (`ttarag bench --kernels`) |
//! | [`training_ops`] (`training_ops.cu`) | the CUDA bodies of `fused::rms_norm` and `fused::swiglu` (f32, bf16), `fused::rope` and `fused::softmax_last_dim` (f32): one launch forward, one backward | differentiable passes on a CUDA device (adaptation), unless `composed_ops` | candle's composed ops, values and gradients (`ttarag bench --kernels`) |

pub mod decode_attention;
pub mod decode_step;
pub mod events;
pub mod graph;
pub mod greedy;
pub mod lora;
pub mod lora_training;
pub mod optimizer;
pub mod training_attention;
pub mod training_ops;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaStream, CudaView, DevicePtr, LaunchArgs, SyncOnDrop,
};
use candle_core::cuda_backend::{CudaDType, CudaStorageSlice};
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Result, Storage, Tensor};

use super::cuda_abi as abi;

/// The `cpu_fwd` of a candle op that has only a CUDA body (its callers hand it CUDA tensors):
/// an error naming the op. `N` is the arity of candle's custom-op trait (1, 2 or 3 operands).
macro_rules! cuda_only {
    (1) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            candle_core::bail!("{} runs on CUDA only", self.name())
        }
    };
}
use cuda_only;

/// The module name candle caches the PTX under, and the PTX.
const OPTIMIZER: (&str, &str) = (
    "ttarag_optimizer",
    include_str!(concat!(env!("OUT_DIR"), "/optimizer.ptx")),
);

const DECODE_ATTENTION: (&str, &str) = (
    "ttarag_decode_attention",
    include_str!(concat!(env!("OUT_DIR"), "/decode_attention.ptx")),
);

const DECODE_STEP: (&str, &str) = (
    "ttarag_decode_step",
    include_str!(concat!(env!("OUT_DIR"), "/decode_step.ptx")),
);

const GREEDY: (&str, &str) = (
    "ttarag_greedy",
    include_str!(concat!(env!("OUT_DIR"), "/greedy.ptx")),
);

const LORA: (&str, &str) = (
    "ttarag_lora",
    include_str!(concat!(env!("OUT_DIR"), "/lora.ptx")),
);

const LORA_TRAINING: (&str, &str) = (
    "ttarag_lora_training",
    include_str!(concat!(env!("OUT_DIR"), "/lora_training.ptx")),
);

const TRAINING_ATTENTION: (&str, &str) = (
    "ttarag_training_attention",
    include_str!(concat!(env!("OUT_DIR"), "/training_attention.ptx")),
);

const TRAINING_OPS: (&str, &str) = (
    "ttarag_training_ops",
    include_str!(concat!(env!("OUT_DIR"), "/training_ops.ptx")),
);

/// Whether these kernels run (`[model] cuda_kernels`); set once at start, for the process.
static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the kernels on or off: off, every caller takes candle's composed ops.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the kernels run.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether adaptation's blocks take the fused path on a GPU (`[model] cuda_fused_training`):
/// one op each for attention, norms and activation, f32 and bf16 models. Off, they keep the
/// composed shape with the fused norms, rotary, softmax and activation.
static FUSED_TRAINING: AtomicBool = AtomicBool::new(false);

/// Sends adaptation's blocks on a GPU through the fused path, or not; set once at start.
pub fn set_fused_training(on: bool) {
    FUSED_TRAINING.store(on, Ordering::Relaxed);
}

/// Whether adaptation's blocks on a GPU take the fused path (and the kernels are on).
pub fn fused_training() -> bool {
    enabled() && FUSED_TRAINING.load(Ordering::Relaxed)
}

/// Loads every module of these kernels into `dev` (the driver compiles their PTX for the GPU
/// then), and every declared entry point from it, so that no request pays for it and a symbol
/// the PTX lacks fails here: the server's warm-up calls it before it says ready.
pub fn preload(dev: &CudaDevice) -> Result<()> {
    for decl in abi::ALL {
        let (module, ptx) = module(decl)?;
        for (_, symbol) in decl.entries {
            dev.get_or_load_custom_func(symbol, module, ptx)?;
        }
    }
    Ok(())
}

/// The module name and PTX of the file that defines `decl`.
fn module(decl: &abi::Decl) -> Result<(&'static str, &'static str)> {
    Ok(match decl.file {
        "optimizer" => OPTIMIZER,
        "decode_attention" => DECODE_ATTENTION,
        "decode_step" => DECODE_STEP,
        "greedy" => GREEDY,
        "lora" => LORA,
        "lora_training" => LORA_TRAINING,
        "training_attention" => TRAINING_ATTENTION,
        "training_ops" => TRAINING_OPS,
        f => candle_core::bail!("{}: no module {f}", decl.name),
    })
}

/// Kernel `decl`'s entry point for elements of `dtype`, loaded on `dev`; its arguments go
/// through the declaration's `push`.
fn function(dev: &CudaDevice, decl: &abi::Decl, dtype: DType) -> Result<Function> {
    let Some(symbol) = decl.symbol(dtype.as_str()) else {
        candle_core::bail!("no {} kernel for {dtype:?} operands", decl.name);
    };
    let (module, ptx) = module(decl)?;
    Ok(Function {
        func: dev
            .get_or_load_custom_func(symbol, module, ptx)?
            .into_cuda_function(),
        stream: dev.cuda_stream(),
    })
}

/// A loaded entry point and the device's stream (candle's own `CudaFunc`, which it does not
/// export by name).
struct Function {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Function {
    /// A launch on the device's stream.
    fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// The elements of a contiguous operand (its layout's offsets), or an error naming `what`.
fn contiguous_view<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
        None => candle_core::bail!("{what}: contiguous operands only"),
    }
}

/// A tensor's elements from its layout's offset on, where a kernel reads a tensor its op holds
/// (the caller checks the layout), or an error naming `what` off the GPU.
fn held_view<'a, T: CudaDType>(s: &'a Storage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = s else {
        candle_core::bail!("{what}: an operand is not on the GPU");
    };
    Ok(s.as_cuda_slice::<T>()?.slice(l.start_offset()..))
}

/// The CUDA device of `t`, or an error naming `what`.
fn cuda_device<'a>(t: &'a Tensor, what: &str) -> Result<&'a CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d),
        _ => candle_core::bail!("{what}: a CUDA tensor was expected"),
    }
}

/// Runs `f` with the device address of the first element of each of `tensors` (on one CUDA
/// device; the callers check the layouts they need), keeping them alive and their storage locked for reading until `f`'s
/// launches are queued. Writes through these addresses (an in-place update) are ordered by
/// the stream, which every candle op on the device shares.
fn with_addresses<R>(
    stream: &CudaStream,
    tensors: &[&Tensor],
    f: impl FnOnce(&[i64]) -> Result<R>,
) -> Result<R> {
    let held: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(held.len());
    let mut addresses = Vec::with_capacity(held.len());
    for (storage, layout) in &held {
        let Storage::Cuda(cs) = &**storage else {
            candle_core::bail!("a CUDA kernel got a tensor on another device");
        };
        let (base, guard, size) = match &cs.slice {
            CudaStorageSlice::F32(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, g, 4)
            }
            CudaStorageSlice::BF16(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, g, 2)
            }
            CudaStorageSlice::F64(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, g, 8)
            }
            CudaStorageSlice::I64(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, g, 8)
            }
            CudaStorageSlice::U32(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, g, 4)
            }
            _ => candle_core::bail!("a CUDA kernel got an unsupported dtype"),
        };
        guards.push(guard);
        addresses.push((base + (layout.start_offset() * size) as u64) as i64);
    }
    let r = f(&addresses);
    drop(guards);
    r
}
