#!/usr/bin/env bash
# Adaptation on the GPU, ttarag against the reference loop in PyTorch + transformers (+ peft),
# same random weights of the default model's shape, same pairs, bf16, in one run.
#
#   scripts/gpu/build.sh                   # on the build machine
#   scripts/gpu/reference.sh [OUT_DIR]     # on the GPU machine, from the repository root
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu-reference}}
mkdir -p "$out"
weights=/tmp/ttarag-random-smollm2
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export RUST_LOG=warn PYTHONUNBUFFERED=1
python3 scripts/gpu/random_weights.py "$weights"
cfg() {
    local f
    f=$(mktemp --suffix .toml)
    printf '%b\n' "$@" >"$f"
    echo "$f"
}
for scope in lora full; do
    lr=$([ $scope = lora ] && echo 1e-4 || echo 1e-5)
    c=$(cfg "[model]\ndtype = \"bf16\"\ndecode_quant = \"none\"\n[tta]\nscope = \"$scope\"\nlr = $lr\nfull_lr = $lr")
    echo "== ttarag $scope" | tee -a "$out/log"
    .gpu/ttarag --config "$c" --model "$weights" --device cuda bench --tta 10 \
        --dump-pairs "$out/pairs.json" 2>&1 | tee -a "$out/log"
    echo "== reference $scope" | tee -a "$out/log"
    DEVICE=cuda DTYPE=bf16 python3 scripts/reference/tta_reference.py "$weights" \
        "$out/pairs.json" $scope $lr 2>&1 | grep -v Warning | tee -a "$out/log"
done
