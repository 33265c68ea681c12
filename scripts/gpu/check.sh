#!/usr/bin/env bash
# GPU check of a `--features cuda` build, on a machine with an NVIDIA GPU and PyTorch (for the
# weights only). The default model's file is too large to send to such a machine, so the check
# runs on random weights of its exact shape, made here with transformers from the config.json
# and tokenizer that `ttarag model export-hf` wrote.
#
#   scripts/gpu/build.sh                      # on the build machine: .gpu/ttarag and .gpu/hf/
#   scripts/gpu/check.sh [OUT_DIR]            # on the GPU machine, from the repository root
#
# Prints, and writes to OUT_DIR/log: greedy parity between CPU and CUDA (f32), prefill/decode
# throughput (f32, bf16), and adaptation time and loss (LoRA, LoRA with activation recompute,
# full) on CUDA in bf16.
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
bin=.gpu/ttarag
weights=/tmp/ttarag-random-smollm2
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}

log() { echo "== $*" | tee -a "$out/log"; }
run() { # one step; a failure is reported and the check goes on
    log "$*"
    "$@" 2>&1 | tee -a "$out/log" || log "FAILED (exit $?): $*"
}
export RUST_LOG=warn

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/log"

python3 scripts/gpu/random_weights.py "$weights"

cfg() { # a config file with the given lines, defaults for the rest
    local f
    f=$(mktemp --suffix .toml)
    printf '%b\n' "$@" >"$f"
    echo "$f"
}
f32=$(cfg '[model]\ndtype = "f32"')
bf16=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"')
lora=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "lora"')
lora_re=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "lora"\nrecompute_activations = true')
full=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "full"')
q="What can damage buildings?"

# Same weights, greedy: the CPU and CUDA builds must choose the same tokens.
cpu=$(run "$bin" --config "$f32" --model "$weights" --device cpu ask --mode none --max-tokens 12 "$q")
gpu=$(run "$bin" --config "$f32" --model "$weights" --device cuda ask --mode none --max-tokens 12 "$q")
# (Line 1 of each is its command, line 2 the answer; timings follow.)
if [ "$(sed -n 2p <<<"$cpu")" = "$(sed -n 2p <<<"$gpu")" ]; then log "parity: CPU and CUDA agree"; else log "parity: CPU and CUDA DIFFER"; fi
# The whole request path on CUDA: retrieval, adaptation, answer.
run "$bin" --config "$lora" --model "$weights" --device cuda ask --mode tta --max-tokens 12 "$q"

run "$bin" --config "$f32" --model "$weights" --device cuda bench --runs 5
run "$bin" --config "$bf16" --model "$weights" --device cuda bench --runs 5
run "$bin" --config "$bf16" --model "$weights" --device cuda bench --runs 5 --prompt-tokens 2000
run "$bin" --config "$lora" --model "$weights" --device cuda bench --tta 10
run "$bin" --config "$lora_re" --model "$weights" --device cuda bench --tta 10
run "$bin" --config "$full" --model "$weights" --device cuda bench --tta 10
log done
