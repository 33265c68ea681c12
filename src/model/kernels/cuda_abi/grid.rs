//! Each kernel's launch shape (grid, block, dynamic shared bytes) from its sizes. The launch
//! code launches with it and the CPU-run tests run the kernel's source with it, so a test
//! exercises the grid the GPU gets; the block sizes are the `.cu` files' `#define`s, which the
//! tests check against the source.

/// `decode_attention.cu`'s `THREADS`.
pub const DECODE_ATTENTION_THREADS: u32 = 128;
/// `decode_step.cu`'s `THREADS` (rotary cache write, SwiGLU) and `NORM_THREADS`.
pub const DECODE_STEP_THREADS: u32 = 128;
pub const NORM_THREADS: u32 = 256;
/// `lora.cu`'s and `lora_training.cu`'s `THREADS`.
pub const LORA_THREADS: u32 = 256;
/// `greedy.cu`'s `THREADS`.
pub const GREEDY_THREADS: u32 = 256;
/// `optimizer.cu`'s `THREADS`, and `CHUNK`: the elements of one tensor a block takes.
pub const OPTIMIZER_THREADS: u32 = 256;
pub const OPTIMIZER_CHUNK: usize = 4096;
/// `training_ops.cu`'s `THREADS`.
pub const OPS_THREADS: u32 = 256;
/// `training_attention.cu`'s `WARPS`: query rows of a block in the rows passes.
pub const ATTN_WARPS: u32 = 4;

/// A launch's grid and block (x, y, z) and its bytes of dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared: u32,
}

impl Launch {
    /// `blocks` blocks of `threads` threads in one dimension, no dynamic shared memory.
    fn blocks(blocks: usize, threads: u32) -> Self {
        Self::of((blocks, 1, 1), threads, 0)
    }

    fn of((x, y, z): (usize, usize, usize), threads: u32, shared: usize) -> Self {
        Self {
            grid: (x as u32, y as u32, z as u32),
            block: (threads, 1, 1),
            shared: shared as u32,
        }
    }
}

/// Blocks of a grid-stride pass over `len` elements, `threads` each (at most 65,535, at
/// least one).
fn strided(len: usize, threads: u32) -> Launch {
    Launch::blocks(len.div_ceil(threads as usize).clamp(1, 65_535), threads)
}

/// One block per (head, row); shared memory holds the query (`d`) and the longest row's
/// scores (`max_len`).
pub fn decode_attention(heads: usize, rows: usize, d: usize, max_len: usize) -> Launch {
    Launch::of(
        (heads, rows, 1),
        DECODE_ATTENTION_THREADS,
        (d + max_len) * 4,
    )
}

/// One block per (KV head, row).
pub fn kv_write(kv_heads: usize, rows: usize) -> Launch {
    Launch::of((kv_heads, rows, 1), DECODE_ATTENTION_THREADS, 0)
}

/// One block per (query or KV head, row).
pub fn rope_cache_write(heads: usize, kv_heads: usize, rows: usize) -> Launch {
    Launch::of((heads + kv_heads, rows, 1), DECODE_STEP_THREADS, 0)
}

/// One block per row.
pub fn add_rms_norm(rows: usize) -> Launch {
    Launch::blocks(rows, NORM_THREADS)
}

/// A grid-stride pass over the `len` outputs.
pub fn swiglu_joint(len: usize) -> Launch {
    strided(len, DECODE_STEP_THREADS)
}

/// One block per row (at least one).
pub fn lora_add(rows: usize) -> Launch {
    Launch::blocks(rows.max(1), LORA_THREADS)
}

/// One block per span.
pub fn lora_restack(spans: usize) -> Launch {
    Launch::blocks(spans.max(1), LORA_THREADS)
}

/// One block per row.
pub fn lora_bwd_rows(rows: usize) -> Launch {
    Launch::blocks(rows, LORA_THREADS)
}

/// A thread per element of dA and dB (`factors` of them together).
pub fn lora_bwd_cols(factors: usize) -> Launch {
    Launch::blocks(factors.div_ceil(LORA_THREADS as usize).max(1), LORA_THREADS)
}

/// One block per row.
pub fn greedy_pick(rows: usize) -> Launch {
    Launch::blocks(rows, GREEDY_THREADS)
}

/// The optimiser's passes over every tensor: one block per `OPTIMIZER_CHUNK` of each
/// (`blocks` in all); the norm and clip factor: one block.
pub fn optimizer(blocks: usize) -> Launch {
    Launch::blocks(blocks, OPTIMIZER_THREADS)
}

/// The shapes of one training-attention call (see `fused::causal_attention`): sequences,
/// positions, query heads, KV heads, head width.
#[derive(Clone, Copy, Debug)]
pub struct AttentionDims {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv: usize,
    pub d: usize,
}

impl AttentionDims {
    /// `(t, heads, kv, d)` as the kernels take them.
    pub fn i32s(&self) -> (i32, i32, i32, i32) {
        (
            self.t as i32,
            self.heads as i32,
            self.kv as i32,
            self.d as i32,
        )
    }

    /// The scores' scale, `1 / sqrt(d)`.
    pub fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// One warp per (head, position, sequence), `heads` of q's or of k's.
pub fn attn_rotate(dims: &AttentionDims, heads: usize) -> Launch {
    Launch::of((heads, dims.t, dims.b), 32, 0)
}

/// The rows passes (forward, and backward by rows): blocks of `ATTN_WARPS` warps, one warp
/// per (head, sequence, row), each warp with `floats` of shared memory.
fn attn_rows(dims: &AttentionDims, floats: usize) -> Launch {
    Launch::of(
        (dims.heads, dims.b, dims.t.div_ceil(ATTN_WARPS as usize)),
        32 * ATTN_WARPS,
        ATTN_WARPS as usize * floats * 4,
    )
}

/// The forward: a warp's shared memory holds its query row (`d`) and its scores (`t`).
pub fn attn_fwd(dims: &AttentionDims) -> Launch {
    attn_rows(dims, dims.d + dims.t)
}

/// The backward by rows: two rows of `d` and two of `t` per warp.
pub fn attn_bwd_rows(dims: &AttentionDims) -> Launch {
    attn_rows(dims, 2 * dims.d + 2 * dims.t)
}

/// The backward by key columns: one warp per (KV head, key row, sequence).
pub fn attn_bwd_cols(dims: &AttentionDims) -> Launch {
    Launch::of((dims.kv, dims.t, dims.b), 32, 0)
}

/// One block per row (at least one): the RMS norm's and softmax's passes.
pub fn ops_rows(rows: usize) -> Launch {
    Launch::blocks(rows.max(1), OPS_THREADS)
}

/// A grid-stride pass over `len` elements: SwiGLU's (its elements), rotary (its pairs).
pub fn ops_elementwise(len: usize) -> Launch {
    strided(len, OPS_THREADS)
}

#[cfg(feature = "cuda")]
impl From<Launch> for candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    fn from(l: Launch) -> Self {
        Self {
            grid_dim: l.grid,
            block_dim: l.block,
            shared_mem_bytes: l.shared,
        }
    }
}
