#!/usr/bin/env bash
# Builds the `cuda` binary for scripts/gpu/check.sh on a machine without a GPU or a CUDA
# install: the CUDA 13.0 toolkit and libraries come as pip wheels, unpacked into a prefix, with a
# link-time stub for libcuda (the GPU machine's driver provides the real one at run time).
# Pinned to 13.0: a 580-series driver cannot load PTX from a newer toolkit.
#
#   scripts/gpu/build.sh [PREFIX]     # writes .gpu/ttarag and .gpu/hf/ (ignored by git)
#
# Needs the default model (make setup) for the tokenizer and config of .gpu/hf/.
set -euo pipefail
cd "$(dirname "$0")/../.."
prefix=${1:-/tmp/ttarag-cuda}
cu="$prefix/nvidia/cu13"
if [ ! -x "$cu/bin/nvcc" ]; then
    mkdir -p "$prefix/wheels"
    python3 -m pip download --no-deps -q -d "$prefix/wheels" \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
        nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
    for w in "$prefix"/wheels/*.whl; do unzip -q -o "$w" -d "$prefix"; done
    chmod +x "$cu"/bin/* "$cu"/nvvm/bin/*
    # The wheels ship versioned sonames only; the linker wants the plain names.
    for l in cublas cublasLt curand nvrtc cudart; do
        ln -sf "$(basename "$(ls "$cu"/lib/lib$l.so.* | head -1)")" "$cu/lib/lib$l.so"
    done
fi
if [ ! -e "$cu/lib/stubs/libcuda.so" ]; then
    # One empty function per driver entry point cudarc declares: enough to link, never run.
    cargo fetch --locked >/dev/null
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys | tail -1)
    mkdir -p "$cu/lib/stubs"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$sys"/*.rs | sort -u |
        awk '{print "void " $1 "(void) {}"}' >"$prefix/cuda_stub.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cu/lib/stubs/libcuda.so" "$prefix/cuda_stub.c"
fi

export CUDA_HOME="$cu" PATH="$cu/bin:$PATH" CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP=90
export NVCC_APPEND_FLAGS=--compress-mode=size CUDAFORGE_THREADS=2
export CARGO_TARGET_DIR="$prefix/target"
export RUSTFLAGS="-C link-arg=-Wl,-rpath,/usr/local/cuda-13.0/targets/x86_64-linux/lib"
cargo build --release --locked --features cuda

mkdir -p .gpu/hf
cp "$prefix/target/release/ttarag" .gpu/ttarag
strip .gpu/ttarag
hf=$(mktemp -d)
# The CPU build: the cuda one cannot start without a driver.
(unset CARGO_TARGET_DIR RUSTFLAGS; cargo run --release --locked -q -- model export-hf --out "$hf")
cp "$hf"/config.json "$hf"/tokenizer.json "$hf"/tokenizer_config.json .gpu/hf/
rm -rf "$hf"
ls -la .gpu .gpu/hf
