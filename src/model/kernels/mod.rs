//! The model's own kernels, named by what they serve. Each exists because candle's composed ops
//! were measured slower (or lack a backward) on that shape; each keeps candle's path beside it
//! as the fallback and as the reference its tests compare against.
//!
//! | kernel | serves | used when | tested against |
//! |---|---|---|---|
//! | [`few_rows`] (`cpu_avx2`, `cpu_avx512`) | adaptation's products of ~10-60 token rows with a large weight | x86-64 CPU, f32 (AVX2 + FMA) or bf16 operands (AVX-512 BF16, `[tta] bf16_products`), at most [`few_rows::MAX_ROWS`] rows | a plain loop (f32, and bf16 on the rounded operands) |
//! | [`frozen_matmul`] | `x W^T` of a weight LoRA does not train: backward returns only the input's gradient | every adapter-carrying projection in a differentiable pass | candle's matmul and its input gradient; f64 matmul for few rows |
//! | [`trained_matmul`] | `x W^T` of a weight full scope trains: both gradients through the few-row kernels | full scope on the CPU in f32 | candle's matmul and its gradients |
//! | [`head_loss`] | the head's cross-entropy a vocabulary chunk at a time, no logits held | adaptation's loss on the CPU | log-softmax cross-entropy and its gradient |
//! | [`fused`] | RMS norm, SwiGLU and rotary causal attention as one op each, with a backward; rotary embedding, softmax and the LoRA delta too | adaptation's block passes on the CPU in f32; on a GPU the norm, SwiGLU, rotary and softmax through their CUDA bodies, and with `[model] cuda_fused_training` attention and the LoRA delta | the composed candle ops and their gradients |
//! | [`quant`] (`cpu_avx2`, `portable`) | decode products on q8_0 / q4_1 weights, a tile of rows per weight block | decode steps on the CPU | dequantized f32 matmul; the portable kernels reproduce the AVX2 ones bit for bit on every CPU |
//! | [`decode_attention`] | one new position per sequence over its own KV cache | decode steps on the CPU in f32 | the attention formula, row by row |
//! | [`greedy`] | each row's greedy token and (where asked) its log-probability from a step's logits, two numbers per row to the host | sampling at temperature 0, every device (CPU: the host formula, bit for bit; CUDA with the project's kernels: `greedy.cu`; elsewhere the logits come to the host in one copy) | candle's argmax and the host log-probability, bit for bit; log-softmax in f64 |
//! | [`rows`] | where a view's rows lie, so a GPU kernel reads a part of a joint product in place | the LoRA add and the rotary cache write on a GPU | contiguous tensors and slices, and layouts it must refuse |
//! | [`cache_rows`] | a decode step whose positions lie on the device: each row's keys and values written at its position, attention up to there | steps replayed from a captured graph (`Decoder::device_step`), CPU f32 or a GPU | the ordinary decode step, bit for bit on the CPU |
//!
//! | [`cuda`] (`--features cuda`) | the GPU's own kernels; its header tabulates them; their entry points' parameters and launch shapes are declared once in `cuda_abi`, which every launch and every CPU-run test goes through | a CUDA device | the CPU path each replaces (`ttarag bench kernels`), and on every machine their own source run on the CPU (`cuda_on_cpu`, tests only) against `cuda_abi`'s declarations |
//!
//! Off the CPU (CUDA) the CPU kernels above fall back to candle's ops.

pub mod cache_rows;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(any(test, feature = "cuda"))]
pub mod cuda_abi;
/// The GPU kernels' source run on the CPU, for tests.
#[cfg(test)]
pub mod cuda_on_cpu;
pub mod decode_attention;
pub mod few_rows;
pub mod frozen_matmul;
pub mod fused;
pub mod greedy;
pub mod head_loss;
pub mod quant;
/// Only GPU kernels read views in place; the CPU tests check it all the same.
#[cfg(any(test, feature = "cuda"))]
pub mod rows;
pub mod trained_matmul;
