"""The TTARAG adaptation loop in PyTorch + transformers (+ peft for LoRA), timed on the same
model, questions and retrieval as `ttarag bench --tta`, for a side-by-side figure.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch transformers gguf accelerate peft
    ttarag bench --tta 10 --dump-pairs /tmp/pairs.json   # the exact pairs ttarag trained on
    /tmp/peers/bin/python scripts/reference/tta_reference.py MODEL.gguf /tmp/pairs.json lora 1e-4
    /tmp/peers/bin/python scripts/reference/tta_reference.py MODEL.gguf /tmp/pairs.json full 1e-5

MODEL may also be a Hugging Face folder; DEVICE=cuda and DTYPE=bf16 run it on a GPU
(scripts/gpu/reference.sh).

Per question: fresh optimiser (AdamW, wd 0.01, eps 1e-8), gradient accumulation 2, global-norm
clip 0.1, loss on suffix tokens only; the timed part is the training loop (no loss before/after).
"""
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

device = os.environ.get("DEVICE", "cpu")
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[os.environ.get("DTYPE", "f32")]
if device == "cpu":
    torch.set_num_threads(2)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
path, pairs_file, scope, lr = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if os.path.isdir(path):
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype).to(device)
else:
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    base = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=dtype).to(device)
questions = json.load(open(pairs_file))

times = []
for q in questions:
    if scope == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    else:
        model = base
        saved = {k: v.detach().clone() for k, v in base.state_dict().items()}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, eps=1e-8)
    sync()
    t0 = time.perf_counter()
    for i, pair in enumerate(q["pairs"]):
        p = tok(pair["prefix"], add_special_tokens=False)["input_ids"]
        s = tok(" " + pair["suffix"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + s], device=device)
        labels = torch.tensor([[-100] * len(p) + s], device=device)
        loss = model(input_ids=ids, labels=labels).loss / 2
        loss.backward()
        if i % 2 == 1 or i == len(q["pairs"]) - 1:
            torch.nn.utils.clip_grad_norm_(params, 0.1)
            opt.step()
            opt.zero_grad()
    sync()
    times.append((time.perf_counter() - t0) * 1e3)
    if scope == "lora":
        base = model.unload()
    else:
        base.load_state_dict(saved)
print(f"reference {scope} lr {lr} {device} {os.environ.get('DTYPE', 'f32')}: {len(times)} questions, adapt median {statistics.median(times):.0f} ms")
