"""Random weights of the default model's exact shape, as a Hugging Face folder, from the
config.json and tokenizer in .gpu/hf/ (scripts/gpu/build.sh): the real file is too large to send
to the GPU machine. With `llama-1b`, Llama-3.2-1B's shape instead (same tokenizer: its ids all
fall inside the larger vocabulary), made on the GPU in bf16.

    python3 scripts/gpu/random_weights.py DEST [llama-1b]
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
    if sys.argv[2:] == ["llama-1b"]:
        cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = 2048, 16, 8192
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 32, 8, 64
        cfg.vocab_size, cfg.tie_word_embeddings = 128256, True
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
        cfg.torch_dtype = "bfloat16"
        model.save_pretrained(dst, safe_serialization=True)
    else:
        transformers.LlamaForCausalLM(cfg).save_pretrained(dst, safe_serialization=True)
for f in ["config.json", "tokenizer.json", "tokenizer_config.json"]:
    shutil.copy(f".gpu/hf/{f}", os.path.join(dst, f))
