//! Every entry point of the project's CUDA kernels (`cuda/*.cu`), declared once: its file, its
//! symbol per element type and its parameters in order. The launch code pushes its arguments
//! only through a declaration's `push` (so the compiler holds each launch to the declared
//! count, order and types), the CPU-run tests call a kernel only through its declared `Fn`,
//! and those tests compile each declaration against the `.cu` source as a C++ static assertion
//! (`cuda_on_cpu`): a launch whose arguments do not match its kernel fails to build or to test
//! on every machine, before it meets a GPU.
//!
//! Why by hand: cudarc's launch builder takes any argument list; nothing ties it to the kernel.

pub mod grid;

/// How a kernel takes a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A pointer to elements it reads (`const T *`).
    In,
    /// A pointer to elements it writes (`T *`).
    Out,
    /// A value (`int`, `float`, a struct).
    Value,
}

/// One parameter: its kind and its C type (`"T"` for the entry's element type).
#[derive(Clone, Copy, Debug)]
#[cfg_attr(not(test), allow(dead_code))] // read by the tests' check against the source
pub struct Param {
    pub kind: Kind,
    pub c: &'static str,
}

/// A kernel's declaration.
#[derive(Clone, Copy, Debug)]
pub struct Decl {
    /// The `.cu` file that defines it, without extension.
    pub file: &'static str,
    pub name: &'static str,
    /// Each element type's symbol: (`"f32"`, `"bf16"` or `"any"`, symbol).
    pub entries: &'static [(&'static str, &'static str)],
    #[cfg_attr(not(test), allow(dead_code))] // read by the tests' check against the source
    pub params: &'static [Param],
}

impl Decl {
    /// The symbol for elements named `key` (`"f32"`, `"bf16"`: candle's `DType::as_str`).
    pub fn symbol(&self, key: &str) -> Option<&'static str> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key || *k == "any")
            .map(|&(_, s)| s)
    }

    /// The C type of each parameter of the entry for elements named `key`.
    #[cfg(test)]
    pub fn c_params(&self, key: &str) -> Vec<String> {
        let elem = match key {
            "bf16" => "__nv_bfloat16",
            _ => "float",
        };
        self.params
            .iter()
            .map(|p| {
                let base = if p.c == "T" { elem } else { p.c };
                match p.kind {
                    Kind::In => format!("const {base} *"),
                    Kind::Out => format!("{base} *"),
                    Kind::Value => base.to_string(),
                }
            })
            .collect()
    }
}

/// A kernel's declaration and its entry points' Rust type, for the tests that call them.
#[cfg(test)]
pub trait Signature {
    const DECL: Decl;
    /// The entry point for elements `T` as an `extern "C"` function (on the CPU, in tests).
    type Fn<T: Copy>: Copy;
}

/// `decode_step.cu`'s `LoraPart`: a LoRA delta's factors by device address (0: none), per-row
/// strides in elements (0: one pair for every row), per-row scales (address) or one scale, rank.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct LoraPart {
    pub a: u64,
    pub b: u64,
    pub scales: u64,
    pub a_stride: i64,
    pub b_stride: i64,
    pub scale: f32,
    pub rank: i32,
}

#[cfg(feature = "cuda")]
pub use gpu::{Addr, In, Out};

#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, CudaViewMut, DeviceRepr, LaunchArgs, PushKernelArg,
    };

    // SAFETY: a plain `repr(C)` struct of integers and a float, laid out as the kernel's (the
    // CPU-run tests assert its size against the C++ struct's).
    unsafe impl DeviceRepr for super::LoraPart {}

    /// A raw device address, for a pointer whose buffer the caller vouches for (a table of
    /// addresses, a null pointer).
    #[derive(Clone, Copy, Debug)]
    pub struct Addr(pub u64);

    impl Addr {
        pub const NULL: Addr = Addr(0);
    }

    /// What a `const T *` parameter takes.
    pub trait In<T> {
        fn push_in<'a>(&'a self, bl: &mut LaunchArgs<'a>);
    }

    /// What a `T *` parameter takes.
    pub trait Out<T> {
        fn push_out<'a>(&'a mut self, bl: &mut LaunchArgs<'a>);
    }

    impl<T> In<T> for CudaSlice<T> {
        fn push_in<'a>(&'a self, bl: &mut LaunchArgs<'a>) {
            bl.arg(self);
        }
    }

    impl<T> In<T> for CudaView<'_, T> {
        fn push_in<'a>(&'a self, bl: &mut LaunchArgs<'a>) {
            bl.arg(self);
        }
    }

    /// A pointer that may be null: `None` passes address 0.
    impl<T, P: In<T>> In<T> for Option<P> {
        fn push_in<'a>(&'a self, bl: &mut LaunchArgs<'a>) {
            static NULL: u64 = 0;
            match self {
                Some(p) => p.push_in(bl),
                None => {
                    bl.arg(&NULL);
                }
            }
        }
    }

    impl<T> In<T> for Addr {
        fn push_in<'a>(&'a self, bl: &mut LaunchArgs<'a>) {
            bl.arg(&self.0);
        }
    }

    impl<T> Out<T> for CudaSlice<T> {
        fn push_out<'a>(&'a mut self, bl: &mut LaunchArgs<'a>) {
            bl.arg(self);
        }
    }

    impl<T> Out<T> for CudaViewMut<'_, T> {
        fn push_out<'a>(&'a mut self, bl: &mut LaunchArgs<'a>) {
            bl.arg(self);
        }
    }

    impl<T> Out<T> for Addr {
        fn push_out<'a>(&'a mut self, bl: &mut LaunchArgs<'a>) {
            bl.arg(&self.0);
        }
    }

    /// A value parameter.
    pub fn value<'a, V: DeviceRepr>(bl: &mut LaunchArgs<'a>, v: &'a V) {
        bl.arg(v);
    }
}

macro_rules! c_name {
    (T) => {
        "T"
    };
    (f32) => {
        "float"
    };
    (f64) => {
        "double"
    };
    (i32) => {
        "int"
    };
    (i64) => {
        "int64_t"
    };
    (LoraPart) => {
        "LoraPart"
    };
}

macro_rules! param {
    (@kind In) => { Kind::In };
    (@kind Out) => { Kind::Out };
    (@kind $v:ident) => { Kind::Value };
    (@c In $t:ident) => { c_name!($t) };
    (@c Out $t:ident) => { c_name!($t) };
    (@c $v:ident) => { c_name!($v) };
    (@rust In $t:ident) => { *const $t };
    (@rust Out $t:ident) => { *mut $t };
    (@rust $v:ident) => { $v };
    (@gpu $a:lifetime In $t:ident) => { &$a impl In<$t> };
    (@gpu $a:lifetime Out $t:ident) => { &$a mut impl Out<$t> };
    (@gpu $a:lifetime $v:ident) => { &$a $v };
    (@push $bl:ident $p:ident In $t:ident) => { In::<$t>::push_in($p, $bl) };
    (@push $bl:ident $p:ident Out $t:ident) => { Out::<$t>::push_out($p, $bl) };
    (@push $bl:ident $p:ident $v:ident) => { gpu::value($bl, $p) };
}

/// Declares kernels: `"file" name<T>? [key "symbol", ...] (param: In<T> | Out<T> | type, ...);`
macro_rules! kernels {
    ($(
        $(#[doc = $doc:literal])*
        $file:literal $name:ident $(<$g:ident>)? [$($key:ident $symbol:literal),+]
        ($($p:ident : $k:ident $(<$t:ident>)?),* $(,)?);
    )*) => {
        $(
            $(#[doc = $doc])*
            pub mod $name {
                #[allow(unused_imports)]
                use super::*;

                pub const DECL: Decl = Decl {
                    file: $file,
                    name: stringify!($name),
                    entries: &[$((stringify!($key), $symbol)),+],
                    params: &[$(Param {
                        kind: param!(@kind $k),
                        c: param!(@c $k $($t)?),
                    }),*],
                };

                /// The kernel as [`Signature`] names it.
                #[cfg(test)]
                pub struct Kernel;

                #[cfg(test)]
                impl Signature for Kernel {
                    const DECL: Decl = DECL;
                    #[allow(unused_parens)]
                    type Fn<T: Copy> = unsafe extern "C" fn($(param!(@rust $k $($t)?)),*);
                }

                /// Pushes a launch's arguments in the declared order.
                #[cfg(feature = "cuda")]
                #[allow(clippy::too_many_arguments)]
                pub fn push<'a $(, $g)?>(
                    bl: &mut candle_core::cuda_backend::cudarc::driver::LaunchArgs<'a>,
                    $($p: param!(@gpu 'a $k $($t)?)),*
                ) {
                    $(param!(@push bl $p $k $($t)?);)*
                }
            }
        )*

        /// Every declaration, for the tests that check them against the source.
        pub const ALL: &[Decl] = &[$($name::DECL),*];
    };
}

kernels! {
    /// One query row per (row, head group) over its cache, through the table of cache addresses.
    "decode_attention" decode_attention<T> [f32 "decode_attention_f32", bf16 "decode_attention_bf16"]
    (q: In<T>, table: In<i64>, out: Out<T>, heads: i32, group: i32, d: i32, scale: f32);

    /// A step's new keys and values written at the positions of the table.
    "decode_attention" kv_write<T> [f32 "kv_write_f32", bf16 "kv_write_bf16"]
    (src_k: In<T>, src_v: In<T>, table: In<i64>, kv_heads: i32, d: i32);

    /// Rotary embedding with the cache write, q/k/v LoRA deltas added first.
    "decode_step" rope_cache_write<T> [f32 "rope_cache_write_f32", bf16 "rope_cache_write_bf16"]
    (q: In<T>, k: In<T>, v: In<T>, q_rs: i64, k_rs: i64, v_rs: i64, cos: In<T>, sin: In<T>,
     table: In<i64>, q_out: Out<T>, heads: i32, d: i32, x: In<T>, inp: i32, lq: LoraPart,
     lk: LoraPart, lv: LoraPart);

    /// The residual add with the next RMS norm (sum and normed rows out).
    "decode_step" add_rms_norm<T> [f32 "add_rms_norm_f32", bf16 "add_rms_norm_bf16"]
    (x: In<T>, a: In<T>, w: In<T>, out: Out<T>, rows: i64, n: i32, eps: f32);

    /// SwiGLU read from the joint gate/up product.
    "decode_step" swiglu_joint<T> [f32 "swiglu_joint_f32", bf16 "swiglu_joint_bf16"]
    (gu: In<T>, out: Out<T>, rows: i64, n: i32);

    /// Each row's greedy token and its log-probability, two f64 per row.
    "greedy" greedy_pick<T> [f32 "greedy_pick_f32", bf16 "greedy_pick_bf16"]
    (logits: In<T>, vocab: i64, out: Out<f64>);

    /// `y + scale B (A x)` per row, shared or gathered factors.
    "lora" lora_add<T> [f32 "lora_add_f32", bf16 "lora_add_bf16"]
    (y: In<T>, x: In<T>, a: In<T>, b: In<T>, scales: In<f32>, scale: f32, out: Out<T>,
     inp: i32, outs: i32, rank: i32, a_stride: i64, b_stride: i64, y_stride: i64);

    /// Spans of bytes copied between buffers, one block each (a step graph's stacks restacked).
    "lora" lora_restack [any "lora_restack"]
    (spans: In<i64>, n: i32);

    /// The LoRA delta's backward, by rows: `h`, `dh`, `dx`.
    "lora_training" lora_bwd_rows<T> [f32 "lora_bwd_rows_f32", bf16 "lora_bwd_rows_bf16"]
    (x: In<T>, a: In<T>, b: In<T>, g: In<T>, scale: f32, h: Out<f32>, dh: Out<f32>, dx: Out<T>,
     inp: i32, outs: i32, rank: i32);

    /// The LoRA delta's backward, by columns: `dA`, `dB`.
    "lora_training" lora_bwd_cols<T> [f32 "lora_bwd_cols_f32", bf16 "lora_bwd_cols_bf16"]
    (x: In<T>, g: In<T>, h: In<f32>, dh: In<f32>, scale: f32, da: Out<T>, db: Out<T>,
     rows: i64, inp: i32, outs: i32, rank: i32);

    /// Per-block partial sums of squares over the tensors of the address table.
    "optimizer" sum_squares [f32 "sum_squares_f32", bf16 "sum_squares_bf16"]
    (ptrs: In<i64>, meta: In<i64>, n: i32, partial: Out<f64>);

    /// The global norm and the clipping scale from the partial sums.
    "optimizer" norm_scale [any "norm_scale"]
    (partial: In<f64>, blocks: i64, clip: f64, out: Out<f64>);

    /// AdamW over every tensor of the address table, moments in f32.
    "optimizer" adamw [f32 "adamw_f32", bf16 "adamw_bf16"]
    (ptrs: In<i64>, meta: In<i64>, n: i32, m: Out<f32>, v: Out<f32>, scale_at: In<f64>,
     scale: f32, lr: f32, b1: f32, b2: f32, eps: f32, decay: f32, inv_c1: f32, inv_c2: f32);

    /// Adaptation's attention: q or k rotated into f32.
    "training_attention" attn_rotate<T> [f32 "attn_rotate_f32", bf16 "attn_rotate_bf16"]
    (x: In<T>, cos: In<f32>, sin: In<f32>, out: Out<f32>, t: i32, heads: i32, d: i32);

    /// Adaptation's attention forward.
    "training_attention" attn_fwd<T> [f32 "attn_fwd_f32", bf16 "attn_fwd_bf16"]
    (qr: In<f32>, kr: In<f32>, v: In<T>, y: Out<T>, t: i32, heads: i32, kv: i32, d: i32,
     scale: f32);

    /// Adaptation's attention backward, by query rows: `ds`, `pr`, `dq`.
    "training_attention" attn_bwd_rows<T> [f32 "attn_bwd_rows_f32", bf16 "attn_bwd_rows_bf16"]
    (qr: In<f32>, kr: In<f32>, v: In<T>, dy: In<T>, cos: In<f32>, sin: In<f32>, ds: Out<f32>,
     pr: Out<f32>, dq: Out<T>, t: i32, heads: i32, kv: i32, d: i32, scale: f32);

    /// Adaptation's attention backward, by key columns: `dk`, `dv`.
    "training_attention" attn_bwd_cols<T> [f32 "attn_bwd_cols_f32", bf16 "attn_bwd_cols_bf16"]
    (qr: In<f32>, dy: In<T>, cos: In<f32>, sin: In<f32>, ds: In<f32>, pr: In<f32>, dk: Out<T>,
     dv: Out<T>, t: i32, heads: i32, kv: i32, d: i32);

    /// RMS norm forward, one row per block.
    "training_ops" rms_norm_fwd<T> [f32 "rms_norm_fwd", bf16 "rms_norm_fwd_bf16"]
    (x: In<T>, w: In<T>, y: Out<T>, n: i32, eps: f32);

    /// RMS norm backward: `dx` rows, then the weight's gradient rows, in f32.
    "training_ops" rms_norm_bwd<T> [f32 "rms_norm_bwd", bf16 "rms_norm_bwd_bf16"]
    (x: In<T>, w: In<T>, g: In<T>, out: Out<f32>, rows: i64, n: i32, eps: f32);

    /// `silu(a) * b`.
    "training_ops" swiglu_fwd<T> [f32 "swiglu_fwd_f32", bf16 "swiglu_fwd_bf16"]
    (a: In<T>, b: In<T>, y: Out<T>, len: i64);

    /// SwiGLU's gradients `da`, `db` (one buffer of twice `len`).
    "training_ops" swiglu_bwd<T> [f32 "swiglu_bwd_f32", bf16 "swiglu_bwd_bf16"]
    (a: In<T>, b: In<T>, g: In<T>, out: Out<T>, len: i64);

    /// Rotary embedding (its backward with `sign` -1).
    "training_ops" rope [f32 "rope_f32"]
    (x: In<f32>, cos: In<f32>, sin: In<f32>, y: Out<f32>, rows: i64, t: i32, d: i32,
     sign: f32);

    /// Softmax over the last dimension.
    "training_ops" softmax_fwd [f32 "softmax_fwd_f32"]
    (x: In<f32>, y: Out<f32>, n: i32);

    /// Softmax's backward.
    "training_ops" softmax_bwd [f32 "softmax_bwd_f32"]
    (y: In<f32>, g: In<f32>, dx: Out<f32>, n: i32);
}
