"""Random weights of the default model's exact shape, as a Hugging Face folder, from the
config.json and tokenizer in .gpu/hf/ (scripts/gpu/build.sh): the real file is too large to send
to the GPU machine.

    python3 scripts/gpu/random_weights.py DEST
"""
import os
import shutil
import sys

import torch
import transformers

dst = sys.argv[1]
if not os.path.exists(os.path.join(dst, "model.safetensors")):
    cfg = transformers.LlamaConfig.from_pretrained(".gpu/hf")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(dst, safe_serialization=True)
for f in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f".gpu/hf/{f}", os.path.join(dst, f))
