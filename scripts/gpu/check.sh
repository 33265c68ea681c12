#!/usr/bin/env bash
# GPU check of a `--features cuda` build, on a machine with an NVIDIA GPU and PyTorch (for the
# weights and the reference). The default model's file is too large to send to such a machine,
# so the check runs on random weights of its exact shape (and of Llama-3.2-1B's), made there with
# transformers from the config.json and tokenizer that `ttarag model export-hf` wrote.
#
#   scripts/gpu/build.sh                      # on the build machine: .gpu/ttarag and .gpu/hf/
#   scripts/gpu/check.sh [OUT_DIR] [PARTS]    # on the GPU machine, from the repository root
#
# PARTS is `all` (the default: steps 1-6), `small` (steps 1-4, the default model's shape and the
# targets' figures), `big` (step 5) or `switches` (step 6): separate calls where one would run
# past a per-call time limit, in that order of worth (each log line says the seconds so far).
#
# In order of what matters most, each step reported and the check going on after a failure:
#  1. the project's CUDA kernels against the candle ops they replace, and a whole decode step
#     replayed from a captured graph against `decode_step` (`bench --kernels`);
#  2. greedy parity, CPU against CUDA (f32), and the whole request path on CUDA;
#  3. per query at the GPU targets' shape (1,000-token prompt, 3 pairs of ~96 tokens, 64 new
#     tokens, bf16): LoRA and full scope (`bench --query`: decode through step graphs and op by
#     op, both timed, with whether their tokens agree);
#  4. the PyTorch reference on the same queries (scripts/reference/query_reference.py); then 8
#     sequences with 8 adapters against one (`bench --batch 1,8 --lora`), and whole requests
#     from 1 and 8 concurrent clients, each adapting its own LoRA (`bench --load 1,8`), also
#     with cuBLAS's workspace off (a race on a shared workspace would show as the difference);
#  5. the same queries and reference for the Llama-3.2-1B shape;
#  6. each switch against the defaults of steps 3 and 4: the project's CUDA kernels off
#     (`[model] cuda_kernels = false`), LoRA with activations rebuilt as on the CPU (`[tta]
#     recompute_on_gpu`), LoRA with the loss before adaptation in a pass of its own (`[tta]
#     score_in_first_step = false`), LoRA and full with cudarc's buffer events on (`[model]
#     cuda_event_tracking`), LoRA through the fused training path and the composed one
#     (`[model] cuda_fused_training`, f32 and bf16), and decode per token with norms and
#     attention in bf16 against converting to f32 (`[model] f32_norms_attention`).
set -euo pipefail
out=${1:-${OUT:-/tmp/gpu-check}}
parts=${2:-all}
case "$parts" in all | small | big | switches) ;; *) echo "PARTS must be all, small, big or switches, not $parts" >&2; exit 2 ;; esac
mkdir -p "$out"
bin=.gpu/ttarag
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib:/usr/local/cuda/lib64:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
export RUST_LOG=warn PYTHONUNBUFFERED=1

# Each line says how far into the check it is: the device time a rerun of the rest would need.
log() { echo "== [${SECONDS} s] $*" | tee -a "$out/log"; }
# A step that hangs (a kernel that never ends) must not cost the steps after it: each has
# STEP_TIMEOUT seconds (exit 124 when it ran out).
step_timeout=${STEP_TIMEOUT:-150}
run() { # one step; a failure is reported and the check goes on
    log "$*"
    timeout --kill-after=5 "$step_timeout" "$@" 2>&1 | tee -a "$out/log" || log "FAILED (exit ${PIPESTATUS[0]}): $*"
}
# A step whose figures also go to $out/summary under LABEL (the lines the issue's table reads:
# per query, adaptation, prefill, decode, nodes, agreement, throughput, the reference's, and
# failures), so the table can be read off one short file after the run.
measure() {
    local label=$1
    shift
    echo "## $label" >>"$out/summary"
    run "$@" | grep -E 'ms per query|adaptation|steps +forward|prefill|per token|nodes|same tokens|\| (static|tta) \||sequences|^\| [0-9]+ \||reference|FAILED|parity|tok/s| ok$' >>"$out/summary" || true
}
cfg() { # a config file with the given lines, defaults for the rest
    local f
    f=$(mktemp --suffix .toml)
    printf '%b\n' "$@" >"$f"
    echo "$f"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$out/log"
small=/tmp/ttarag-random-smollm2
python3 scripts/gpu/random_weights.py "$small"

f32=$(cfg '[model]\ndtype = "f32"')
bf16=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"')
bf16_conv=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\nf32_norms_attention = true')
lora=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "lora"')
full=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "full"')
# The same without the project's CUDA kernels: candle's composed ops, the baseline they beat.
lora_off=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\ncuda_kernels = false\n[tta]\nscope = "lora"')
full_off=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\ncuda_kernels = false\n[tta]\nscope = "full"')
q="What can damage buildings?"
shape="--prompt-tokens 1000 --new-tokens 64"

if [ "$parts" = all ] || [ "$parts" = small ]; then
    # 1. Kernels.
    measure "kernels (SmolLM2 shape, bf16)" "$bin" --config "$bf16" --model "$small" --device cuda bench --kernels 5

    # 2. Same weights, greedy: the CPU and CUDA builds must choose the same tokens.
    cpu=$(run "$bin" --config "$f32" --model "$small" --device cpu ask --mode none --max-tokens 12 "$q")
    gpu=$(run "$bin" --config "$f32" --model "$small" --device cuda ask --mode none --max-tokens 12 "$q")
    if [ "$(sed -n 2p <<<"$cpu")" = "$(sed -n 2p <<<"$gpu")" ]; then log "parity: CPU and CUDA agree"; else log "parity: CPU and CUDA DIFFER"; fi
    run "$bin" --config "$lora" --model "$small" --device cuda ask --mode tta --max-tokens 12 "$q"

    # 3. Per query.
    for scope in lora full; do
        c=$([ $scope = lora ] && echo "$lora" || echo "$full")
        measure "query SmolLM2 $scope bf16" "$bin" --config "$c" --model "$small" --device cuda bench --query 5 $shape \
            --dump-query "$out/query-smollm2-$scope.json"
    done
    # 4. The reference on the same queries: the targets' ratio.
    for scope in lora full; do
        measure "PyTorch reference SmolLM2 $scope bf16" env DEVICE=cuda DTYPE=bf16 python3 scripts/reference/query_reference.py "$small" \
            "$out/query-smollm2-$scope.json" 5
    done
    # 8 sequences, each its own LoRA, against one: decode throughput, each row alone and gathered.
    measure "batch 1 and 8 sequences, own LoRAs" "$bin" --config "$lora" --model "$small" --device cuda bench --batch 1,8 --lora --runs 3 $shape
    # Whole requests from 1 and 8 concurrent clients through the engine (8 stage workers, each
    # request adapting its own LoRA in mode tta; the scheduler batches the answers): req/s,
    # whether each answer under 8 clients is the one it gave alone ("same answers": candle's
    # threads share one cuBLAS handle across their streams, so a race would show there), and
    # the step graphs captured per decode step (a capture per batch composition: what rows
    # joining and leaving cost).
    idx=/tmp/ttarag-check-index
    run "$bin" --index-dir "$idx" index build --collection qasc --input index/samples/qasc/corpus.jsonl
    load=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "lora"\n[server]\nworkers = 8')
    measure "load 1 and 8 clients" "$bin" --config "$load" --model "$small" --device cuda --index-dir "$idx" bench --load 1,8 --modes static,tta
    # The same with cuBLAS's workspace off: where the answers above differ and these agree, the
    # race is the shared workspace (and this setting its cure, at this throughput).
    measure "load 1 and 8 clients, cuBLAS without workspace" env CUBLAS_WORKSPACE_CONFIG=:0:0 "$bin" --config "$load" --model "$small" \
        --device cuda --index-dir "$idx" bench --load 1,8 --modes static,tta
fi

if [ "$parts" = all ] || [ "$parts" = big ]; then
    # 5. Llama-3.2-1B's shape.
    big=/tmp/ttarag-random-llama-1b
    run python3 scripts/gpu/random_weights.py "$big" llama-1b
    for scope in lora full; do
        c=$([ $scope = lora ] && echo "$lora" || echo "$full")
        measure "query Llama-3.2-1B $scope bf16" "$bin" --config "$c" --model "$big" --device cuda bench --query 5 $shape \
            --dump-query "$out/query-llama1b-$scope.json"
        measure "PyTorch reference Llama-3.2-1B $scope bf16" env DEVICE=cuda DTYPE=bf16 python3 scripts/reference/query_reference.py "$big" \
            "$out/query-llama1b-$scope.json" 5
    done
fi
if [ "$parts" = all ] || [ "$parts" = switches ]; then
    # 6. Each switch against the defaults of steps 3 and 4 (the same shapes, one change each):
    # what each lever is worth, after the targets' own figures.
    measure "query SmolLM2 lora bf16, project kernels off" "$bin" --config "$lora_off" --model "$small" --device cuda bench --query 5 $shape
    measure "query SmolLM2 full bf16, project kernels off" "$bin" --config "$full_off" --model "$small" --device cuda bench --query 5 $shape
    # LoRA with its activations rebuilt as on the CPU, against kept (the GPU's default).
    rebuilt=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "lora"\nrecompute_on_gpu = true')
    measure "query SmolLM2 lora bf16, activations rebuilt" "$bin" --config "$rebuilt" --model "$small" --device cuda bench --query 5 $shape
    # LoRA with the loss before adaptation of the pairs outside the first step's group in a
    # pass of their own, against scored in that step's forward (the default off the CPU).
    separate=$(cfg '[model]\ndtype = "bf16"\ndecode_quant = "none"\n[tta]\nscope = "lora"\nscore_in_first_step = false')
    measure "query SmolLM2 lora bf16, loss before in a pass of its own" "$bin" --config "$separate" --model "$small" --device cuda bench --query 5 $shape
    # LoRA and full with cudarc's per-buffer events on (two made and destroyed per tensor, so per
    # op), against off (the default, the LoRA and full runs above): what the host saves per query.
    for scope in lora full; do
        c=$(cfg "[model]\ndtype = \"bf16\"\ndecode_quant = \"none\"\ncuda_event_tracking = true\n[tta]\nscope = \"$scope\"")
        measure "query SmolLM2 $scope bf16, buffer events on" "$bin" --config "$c" --model "$small" --device cuda bench --query 5 $shape
    done
    # LoRA adaptation through the fused training path (attention one op each way) against the
    # composed one, in the same run: f32 both ways, bf16 on (bf16 off is the LoRA run above).
    for model in "f32 false" "f32 true" "bf16 true"; do
        read -r dt fused <<<"$model"
        c=$(cfg "[model]\ndtype = \"$dt\"\ndecode_quant = \"none\"\ncuda_fused_training = $fused\n[tta]\nscope = \"lora\"")
        measure "query SmolLM2 lora $dt, cuda_fused_training $fused" "$bin" --config "$c" --model "$small" --device cuda bench --query 5 $shape
    done
    measure "decode bf16" "$bin" --config "$bf16" --model "$small" --device cuda bench --runs 5 $shape
    measure "decode bf16, f32 norms and attention" "$bin" --config "$bf16_conv" --model "$small" --device cuda bench --runs 5 $shape
    measure "decode bf16, project kernels off" "$bin" --config "$lora_off" --model "$small" --device cuda bench --runs 5 $shape
fi

log done
cat "$out/summary"
