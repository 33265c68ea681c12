//! The GPU's own kernels (`model/kernels/cuda/*.cu`) run on the CPU, for tests: each `.cu`
//! file is compiled as C++ against `runtime.hpp` (threads, barriers, warp shuffles, shared
//! memory and bf16 on the CPU) into a shared library, with static assertions that each entry
//! point takes the parameters `cuda_abi` declares, and a test calls its entry points through
//! those declarations with host buffers, on the same grids and blocks the launch code uses. The kernels' bodies
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

pub use super::cuda_abi as abi;
pub use abi::grid::{self, Launch};
use abi::Signature;

mod decode;
mod training;

/// A `.cu` file compiled for the CPU and loaded.
pub struct Library {
    handle: *mut c_void,
    /// The shared library's file.
    path: PathBuf,
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
    let mut libs = LIBS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, l)) = libs.iter().find(|(n, _)| *n == name) {
        return l;
    }
    let lib: &'static Library = Box::leak(Box::new(build(name)));
    libs.push((name, lib));
    lib
}

/// This process's folder for the kernels' C++ and libraries.
fn build_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ttarag-cuda-on-cpu-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("a build folder for the kernels");
        // The kernels include <cuda_bf16.h>; the runtime defines what they take from it.
        std::fs::write(d.join("cuda_bf16.h"), "#pragma once\n").expect("write cuda_bf16.h");
        d
    })
}

/// `name`.cu as C++ for the runtime, followed by the static assertions of `decls` (see
/// [`signature_asserts`]), written to `cpp` in the build folder.
fn write_cpp(name: &str, cpp: &str, decls: &[abi::Decl]) -> PathBuf {
    let text =
        std::fs::read_to_string(source_dir().join(format!("{name}.cu"))).expect("read the kernel");
    // The one construct the runtime cannot define: dynamic shared memory, declared `extern`.
    let text = text.replace(
        "extern __shared__ float sh[];",
        "float *sh = emu_dynamic_shared();",
    );
    assert!(
        !text.contains("extern __shared__"),
        "{name}.cu declares dynamic shared memory in a way the CPU runtime does not rewrite"
    );
    let text = format!("{text}\n{}", signature_asserts(decls));
    let path = build_dir().join(cpp);
    std::fs::write(&path, text).expect("write the kernel's C++");
    path
}

/// Runs the C++ compiler on `cpp` with the runtime included first, then `args`.
fn compile(cpp: &Path, args: &[&str]) -> std::process::Output {
    let src = source_dir();
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    Command::new(&cxx)
        .args(["-std=c++20", "-pthread", "-w"])
        .args(args)
        .arg("-include")
        .arg(src.parent().unwrap().join("cuda_on_cpu/runtime.hpp"))
        .arg("-I")
        .arg(build_dir())
        .arg("-I")
        .arg(&src)
        .arg(cpp)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}` (set CXX): {e}"))
}

fn build(name: &str) -> Library {
    let decls: Vec<abi::Decl> = abi::ALL
        .iter()
        .filter(|d| d.file == name)
        .copied()
        .collect();
    let cpp = write_cpp(name, &format!("{name}.cpp"), &decls);
    let so = build_dir().join(format!("lib{name}.so"));
    let so_arg = so.to_str().expect("a UTF-8 temp path");
    let out = compile(
        &cpp,
        &[
            "-O1",
            "-shared",
            "-fPIC",
            "-fvisibility=hidden",
            "-o",
            so_arg,
        ],
    );
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
        path: so,
        // SAFETY: `emu_launch` is defined by runtime.hpp with exactly this signature.
        launch: unsafe { lookup::<LaunchFn>(handle, "emu_launch") },
        running: Mutex::new(()),
    }
}

/// C++ static assertions that every entry point `cuda_abi` declares in `file`.cu has the
/// declared parameters, in order, and that the structs passed by value have the Rust size: a
/// library whose launch code and kernels disagree does not build.
fn signature_asserts(decls: &[abi::Decl]) -> String {
    let mut out = format!(
        "#include <type_traits>\nstatic_assert(sizeof(void *) == 8);\n{}",
        if decls
            .iter()
            .any(|d| d.params.iter().any(|p| p.c == "LoraPart"))
        {
            format!(
                "static_assert(sizeof(LoraPart) == {});\n",
                std::mem::size_of::<abi::LoraPart>()
            )
        } else {
            String::new()
        }
    );
    for decl in decls {
        for &(key, symbol) in decl.entries {
            let params = decl.c_params(key).join(", ");
            out += &format!(
                "static_assert(std::is_same_v<decltype(&{symbol}), void (*)({params})>, \
                 \"{symbol} does not take ({params}) as cuda_abi::{} declares\");\n",
                decl.name
            );
        }
    }
    out
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
    unsafe fn symbol<F: Copy>(&self, name: &str) -> F {
        unsafe { lookup(self.handle, name) }
    }

    /// Kernel `K`'s entry point for elements `T`, as `cuda_abi` declares it (the library's
    /// build asserted that the source agrees).
    pub fn entry<K: Signature, T: Elem>(&self) -> K::Fn<T> {
        let decl = K::DECL;
        let symbol = decl
            .symbol(T::SUFFIX)
            .unwrap_or_else(|| panic!("{} has no {} entry", decl.name, T::SUFFIX));
        // SAFETY: `K::Fn<T>` is the declared signature, which `signature_asserts` compiled
        // against the kernel's definition.
        unsafe { self.symbol(symbol) }
    }

    /// Runs `body` (a call of one of this library's entry points) as every thread of the
    /// launch `l` (the launch code's, from `cuda_abi::grid`).
    ///
    /// # Safety
    /// The buffers `body` passes must hold what the kernel reads and writes at this launch.
    pub unsafe fn launch<F: Fn()>(&self, l: Launch, body: F) {
        let (grid, block, shared) = (l.grid, l.block, l.shared);
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

/// Asserts that `file`.cu defines `name` as `value` (`#define NAME value`): the kernel's
/// own size of what `cuda_abi::grid` launches it with.
#[track_caller]
pub fn assert_define<T: std::fmt::Display>(file: &str, name: &str, value: T) {
    let path = source_dir().join(format!("{file}.cu"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let define = format!("#define {name} {value}\n");
    assert!(
        text.contains(&define),
        "{file}.cu lacks `{}`",
        define.trim()
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// The kernel entry points `lib` exports (`nm`): every `extern "C"` symbol but the
    /// runtime's own.
    fn exported(lib: &Library) -> BTreeSet<String> {
        let out = Command::new("nm")
            .args(["-D", "--defined-only"])
            .arg(&lib.path)
            .output()
            .expect("run nm");
        assert!(out.status.success(), "nm {}", lib.path.display());
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
                [_, "T", name] if !name.starts_with("emu_") && !name.starts_with('_') => {
                    Some(name.to_string())
                }
                _ => None,
            })
            .collect()
    }

    /// `cuda_abi` declares every `.cu` file's every entry point and no other: with the static
    /// assertions each library is built with, every kernel the launch code can reach has the
    /// declared parameters, and no kernel is launched through an undeclared list.
    #[test]
    fn every_kernel_entry_point_is_declared_with_its_parameters() {
        let files: BTreeSet<String> = std::fs::read_dir(source_dir())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(".cu").map(str::to_string)
            })
            .collect();
        let declared: BTreeSet<String> = abi::ALL.iter().map(|d| d.file.to_string()).collect();
        assert_eq!(
            files, declared,
            "the .cu files and the files cuda_abi declares"
        );
        for decl in abi::ALL {
            let lib = library(decl.file);
            let symbols: BTreeSet<String> = abi::ALL
                .iter()
                .filter(|d| d.file == decl.file)
                .flat_map(|d| d.entries.iter().map(|(_, s)| s.to_string()))
                .collect();
            assert_eq!(exported(lib), symbols, "{}.cu's entry points", decl.file);
        }
    }

    /// The static assertions refuse a declaration that disagrees with its kernel: a parameter
    /// of another type, one parameter missing, or two swapped.
    #[test]
    fn a_declaration_that_disagrees_with_its_kernel_does_not_build() {
        let decl = abi::lora_add::DECL;
        let mut wider = decl.params.to_vec();
        wider[7].c = "int64_t"; // `in` is an int
        let mut swapped = decl.params.to_vec();
        swapped.swap(1, 5); // x and scale
        let short = &decl.params[..decl.params.len() - 1];
        for (i, (what, params)) in [
            ("a wider integer", wider.as_slice()),
            ("two parameters swapped", swapped.as_slice()),
            ("one parameter missing", short),
        ]
        .into_iter()
        .enumerate()
        {
            let params: &'static [abi::Param] = Box::leak(params.to_vec().into_boxed_slice());
            let wrong = abi::Decl { params, ..decl };
            let cpp = write_cpp("lora", &format!("wrong-{i}.cpp"), &[wrong]);
            let out = compile(&cpp, &["-fsyntax-only"]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && err.contains("lora_add_f32 does not take"),
                "{what}: the C++ compiler accepted it:\n{err}"
            );
        }
        // The true declaration builds.
        let cpp = write_cpp("lora", "right.cpp", &[decl]);
        let out = compile(&cpp, &["-fsyntax-only"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The launch code pushes every kernel argument through `cuda_abi` and loads every kernel
    /// by its declaration, so the checks above cover every launch.
    #[test]
    fn the_launch_code_launches_only_through_the_declarations() {
        for entry in std::fs::read_dir(source_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let file = path.file_name().unwrap().to_string_lossy();
                assert!(!text.contains(".arg("), "{file} pushes an argument by hand");
                let loads = text.matches("get_or_load_custom_func").count();
                let allowed = if file == "mod.rs" { 2 } else { 0 };
                assert_eq!(loads, allowed, "{file} loads a kernel by name");
            }
        }
    }

    /// The runtime itself: block sums through shared memory and barriers, warp shuffles and
    /// bf16 rounding behave as on a GPU, checked on the project's own LoRA kernel.
    #[test]
    fn the_runtime_runs_a_kernel_with_barriers_shuffles_and_shared_memory() {
        let lib = library("lora");
        let f = lib.entry::<abi::lora_add::Kernel, f32>();
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
            lib.launch(grid::lora_add(rows), || {
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
