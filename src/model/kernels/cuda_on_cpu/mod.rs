//! The GPU's own kernels (`model/kernels/cuda/*.cu`) run on the CPU, for tests: each `.cu`
//! file is compiled as C++ against `runtime.hpp` (threads, barriers, warp shuffles, shared
//! memory and bf16 on the CPU) into a shared library, and a test calls its entry points with
//! host buffers, through the same grids and blocks the launch code uses. The kernels' bodies
//! are thus checked against the CPU references on every machine, CI included, not only on a
//! GPU (`ttarag bench --kernels` still checks them there, with the launch code and nvcc).
//!
//! Why by hand: no crate runs CUDA C++ without a GPU; the runtime needs only the handful of
//! features the kernels use, and a C++ compiler is already needed to build the tokenizer.

use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Tensor};

mod decode;
mod training;

/// A `.cu` file compiled for the CPU and loaded.
pub struct Library {
    handle: *mut c_void,
    launch: LaunchFn,
    /// A launch's grid, block and `__shared__` variables are the library's globals: one
    /// launch at a time (tests run on several threads).
    running: Mutex<()>,
}

// The handle is only read (dlsym) after loading, and the library is never unloaded.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

type LaunchFn = unsafe extern "C" fn(
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    usize,
    unsafe extern "C" fn(*mut c_void),
    *mut c_void,
);

fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/kernels/cuda")
}

/// Compiles `name`.cu (e.g. "lora") once per test process and loads it.
pub fn library(name: &'static str) -> &'static Library {
    static LIBS: Mutex<Vec<(&'static str, &'static Library)>> = Mutex::new(Vec::new());
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let mut libs = LIBS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, l)) = libs.iter().find(|(n, _)| *n == name) {
        return l;
    }
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ttarag-cuda-on-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a build folder for the kernels");
        // The kernels include <cuda_bf16.h>; the runtime defines what they take from it.
        std::fs::write(d.join("cuda_bf16.h"), "#pragma once\n").expect("write cuda_bf16.h");
        d
    });
    let lib: &'static Library = Box::leak(Box::new(build(name, dir)));
    libs.push((name, lib));
    lib
}

fn build(name: &str, dir: &Path) -> Library {
    let src = source_dir();
    let text = std::fs::read_to_string(src.join(format!("{name}.cu"))).expect("read the kernel");
    // The one construct the runtime cannot define: dynamic shared memory, declared `extern`.
    let text = text.replace(
        "extern __shared__ float sh[];",
        "float *sh = emu_dynamic_shared();",
    );
    assert!(
        !text.contains("extern __shared__"),
        "{name}.cu declares dynamic shared memory in a way the CPU runtime does not rewrite"
    );
    let cpp = dir.join(format!("{name}.cpp"));
    std::fs::write(&cpp, text).expect("write the kernel's C++");
    let so = dir.join(format!("lib{name}.so"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O1",
            "-pthread",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-w",
        ])
        .arg("-include")
        .arg(src.parent().unwrap().join("cuda_on_cpu/runtime.hpp"))
        .arg("-I")
        .arg(dir)
        .arg("-I")
        .arg(&src)
        .arg(&cpp)
        .arg("-o")
        .arg(&so)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}` (set CXX): {e}"));
    assert!(
        out.status.success(),
        "{name}.cu did not compile for the CPU:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = CString::new(so.to_str().expect("a UTF-8 temp path")).unwrap();
    // SAFETY: a library this function just built; RTLD_LOCAL keeps each runtime's state its own.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "cannot load {}", so.display());
    Library {
        handle,
        // SAFETY: `emu_launch` is defined by runtime.hpp with exactly this signature.
        launch: unsafe { lookup::<LaunchFn>(handle, "emu_launch") },
        running: Mutex::new(()),
    }
}

/// The symbol `name` of the loaded library `handle` as a function of type `F`.
///
/// # Safety
/// `F` must be the `extern "C"` signature the symbol is declared with.
unsafe fn lookup<F: Copy>(handle: *mut c_void, name: &str) -> F {
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    let c = CString::new(name).unwrap();
    let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
    assert!(!p.is_null(), "no entry point `{name}`");
    unsafe { std::mem::transmute_copy(&p) }
}

impl Library {
    /// The entry point `name` as a function of type `F`.
    ///
    /// # Safety
    /// `F` must be the `extern "C"` signature the kernel is declared with.
    pub unsafe fn symbol<F: Copy>(&self, name: &str) -> F {
        unsafe { lookup(self.handle, name) }
    }

    /// The entry point `{base}_{T::SUFFIX}` (e.g. `adamw_bf16`) as a function of type `F`.
    ///
    /// # Safety
    /// As [`Library::symbol`].
    pub unsafe fn kernel<T: Elem, F: Copy>(&self, base: &str) -> F {
        unsafe { self.symbol(&format!("{base}_{}", T::SUFFIX)) }
    }

    /// Runs `body` (a call of one of this library's entry points) as every thread of a
    /// `grid` of `block`s with `shared` bytes of dynamic shared memory.
    ///
    /// # Safety
    /// The buffers `body` passes must hold what the kernel reads and writes at this launch.
    pub unsafe fn launch<F: Fn()>(
        &self,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared: u32,
        body: F,
    ) {
        unsafe extern "C" fn call<F: Fn()>(ctx: *mut c_void) {
            // A panic must not unwind into C++: abort instead (a test failure either way).
            let f = unsafe { &*(ctx as *const F) };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                std::process::abort();
            }
        }
        let ctx = &body as *const F as *mut c_void;
        let _one = self.running.lock().unwrap_or_else(|e| e.into_inner());
        unsafe {
            (self.launch)(
                grid.0,
                grid.1,
                grid.2,
                block.0,
                block.1,
                block.2,
                shared as usize,
                call::<F>,
                ctx,
            )
        };
    }
}

/// `lora.cu`'s `lora_add_*`: (y, x, a, b, scales, scale, out, in, outs, rank, a_stride,
/// b_stride, y_stride).
pub type LoraAddFn<T> = unsafe extern "C" fn(
    *const T,
    *const T,
    *const T,
    *const T,
    *const f32,
    f32,
    *mut T,
    i32,
    i32,
    i32,
    i64,
    i64,
    i64,
);

/// bf16 bits of `x`, rounded to nearest even (as the kernels' stores and `half` round).
pub fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// `x` as f32 from its bf16 bits.
pub fn from_bf16(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}

/// An element type of the kernels: f32, or bf16 held as its bits.
pub trait Elem: Copy + std::fmt::Debug {
    /// The entry points' suffix.
    const SUFFIX: &'static str;
    /// What an output buffer holds before a launch: NaN (0xffff in bf16), so an element a
    /// kernel leaves unwritten, or writes where it must not, shows.
    const UNWRITTEN: Self;
    /// `x` as the kernels store it (bf16 rounded to nearest even).
    fn of(x: f32) -> Self;
    fn f32(self) -> f32;
    /// The stored bits, for comparisons that must hold bit for bit (NaN included).
    fn bits(self) -> u32;
    fn f64(self) -> f64 {
        self.f32() as f64
    }
}

impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
    const UNWRITTEN: Self = f32::NAN;
    fn of(x: f32) -> Self {
        x
    }
    fn f32(self) -> f32 {
        self
    }
    fn bits(self) -> u32 {
        self.to_bits()
    }
}

impl Elem for u16 {
    const SUFFIX: &'static str = "bf16";
    const UNWRITTEN: Self = 0xffff;
    fn of(x: f32) -> Self {
        bf16_bits(x)
    }
    fn f32(self) -> f32 {
        from_bf16(self)
    }
    fn bits(self) -> u32 {
        self as u32
    }
}

pub fn elems<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::of(x)).collect()
}

pub fn to_f32s<T: Elem>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.f32()).collect()
}

/// `v` as the kernels of `T` see it: bf16-rounded for bf16, unchanged for f32.
pub fn rounded<T: Elem>(v: &[f32]) -> Vec<f32> {
    to_f32s(&elems::<T>(v))
}

/// `n` deterministic values in [-scale, scale) from `seed` (a 64-bit LCG's top 24 bits).
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            scale * ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        })
        .collect()
}

/// Asserts `|got[i] - want[i]| <= tolerance(i, want[i])` element by element, in f64 (a NaN
/// fails); `want` is the reference, f32 or f64.
#[track_caller]
pub fn assert_close_with<T: Elem, W: Copy + Into<f64>>(
    what: &str,
    got: &[T],
    want: &[W],
    tolerance: impl Fn(usize, f64) -> f64,
) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.f64(), w.into());
        let tol = tolerance(i, w);
        // Written so that a NaN fails.
        assert!(
            (g - w).abs() <= tol,
            "{what}[{i}]: kernel {g}, reference {w} (tolerance {tol})"
        );
    }
}

/// Asserts `|got - want| <= rel |want| + abs` element by element (see [`assert_close_with`]).
#[track_caller]
pub fn assert_close<T: Elem, W: Copy + Into<f64>>(
    what: &str,
    got: &[T],
    want: &[W],
    rel: f64,
    abs: f64,
) {
    assert_close_with(what, got, want, |_, w| rel * w.abs() + abs);
}

/// `v` as an f32 CPU tensor of `shape`.
pub fn tensor(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

/// `t`'s elements in order, as f32.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts that `file`.cu defines `name` as `value` (`#define NAME value`) and that its
/// launch code `file`.rs declares the same (`const NAME: u32 = value;`, the type `value`'s),
/// so that a launch mirrored in a test uses the kernel's and the launch code's own constant.
#[track_caller]
pub fn assert_constant<T: std::fmt::Display>(file: &str, name: &str, value: T) {
    let read = |ext: &str| {
        let path = source_dir().join(format!("{file}.{ext}"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    };
    let define = format!("#define {name} {value}\n");
    assert!(
        read("cu").contains(&define),
        "{file}.cu lacks `{}`",
        define.trim()
    );
    let constant = format!("const {name}: {} = {value};", std::any::type_name::<T>());
    assert!(
        read("rs").contains(&constant),
        "{file}.rs lacks `{constant}`"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime itself: block sums through shared memory and barriers, warp shuffles and
    /// bf16 rounding behave as on a GPU, checked on the project's own LoRA kernel.
    #[test]
    fn the_runtime_runs_a_kernel_with_barriers_shuffles_and_shared_memory() {
        let lib = library("lora");
        let f: LoraAddFn<f32> = unsafe { lib.symbol("lora_add_f32") };
        let (rows, inn, outs, rank) = (3usize, 70usize, 40usize, 4usize);
        let x: Vec<f32> = (0..rows * inn)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let a: Vec<f32> = (0..rank * inn)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 16.0)
            .collect();
        let b: Vec<f32> = (0..outs * rank)
            .map(|i| ((i * 3 % 7) as f32 - 3.0) / 4.0)
            .collect();
        let y: Vec<f32> = (0..rows * outs).map(|i| i as f32 / 10.0).collect();
        let mut out = vec![f32::NAN; rows * outs];
        let (xp, ap, bp, yp, op) = (
            x.as_ptr(),
            a.as_ptr(),
            b.as_ptr(),
            y.as_ptr(),
            out.as_mut_ptr(),
        );
        unsafe {
            lib.launch((rows as u32, 1, 1), (256, 1, 1), 0, || {
                f(
                    yp,
                    xp,
                    ap,
                    bp,
                    std::ptr::null(),
                    0.5,
                    op,
                    inn as i32,
                    outs as i32,
                    rank as i32,
                    0,
                    0,
                    outs as i64,
                )
            })
        };
        for r in 0..rows {
            let h: Vec<f64> = (0..rank)
                .map(|k| {
                    (0..inn)
                        .map(|i| a[k * inn + i] as f64 * x[r * inn + i] as f64)
                        .sum()
                })
                .collect();
            for j in 0..outs {
                let d: f64 = (0..rank).map(|k| b[j * rank + k] as f64 * h[k]).sum();
                let want = y[r * outs + j] as f64 + 0.5 * d;
                assert!(
                    (out[r * outs + j] as f64 - want).abs() < 1e-4,
                    "row {r} col {j}"
                );
            }
        }
        assert_eq!(bf16_bits(1.0 + 1.0 / 256.0), 0x3f80, "ties round to even");
    }
}
