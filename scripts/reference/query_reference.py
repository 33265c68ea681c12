"""Whole test-time-adapted answers in PyTorch + transformers (+ peft), on the query that
`ttarag bench --query N --dump-query Q.json` ran: the same prompt ids, the same pair ids and the
same settings, for a side-by-side figure.

    DEVICE=cuda DTYPE=bf16 python3 scripts/reference/query_reference.py MODEL_DIR Q.json RUNS

Per query (median of RUNS after one untimed): static (prefill and greedy new tokens, no
adaptation) and TTA (the adaptation loop of scripts/reference/tta_reference.py on the dumped
pairs, then the same answer through the adapted model), with a device synchronisation around
each.
"""
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

device = os.environ.get("DEVICE", "cpu")
dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[os.environ.get("DTYPE", "f32")]
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
path, qfile, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
q = json.load(open(qfile))
base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
base.eval()
prompt = torch.tensor([q["prompt_ids"]], device=device)
n_new = q["new_tokens"]


def answer(m):
    with torch.no_grad():
        m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                   max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)


def adapt(m, params):
    opt = torch.optim.AdamW(params, lr=q["lr"], weight_decay=q["weight_decay"], eps=q["eps"])
    acc, pairs = q["grad_accum"], q["pairs"]
    m.train()
    for i, p in enumerate(pairs):
        ids = torch.tensor([p["ids"]], device=device)
        labels = ids.clone()
        labels[0, : p["suffix_start"]] = -100
        loss = m(input_ids=ids, labels=labels).loss / acc
        loss.backward()
        if (i + 1) % acc == 0 or i == len(pairs) - 1:
            if q["clip_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(params, q["clip_norm"])
            opt.step()
            opt.zero_grad(set_to_none=True)
    m.eval()


static, tta, adapt_ms = [], [], []
for run in range(runs + 1):
    sync()
    t0 = time.perf_counter()
    answer(base)
    sync()
    s = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    if q["scope"] == "lora":
        from peft import LoraConfig, get_peft_model

        targets = [f"{t}_proj" for t in q["lora_targets"]]
        model = get_peft_model(base, LoraConfig(r=q["lora_rank"], lora_alpha=q["lora_alpha"],
                                                lora_dropout=0.0, target_modules=targets))
        adapt(model, [p for p in model.parameters() if p.requires_grad])
        sync()
        a = (time.perf_counter() - t0) * 1e3
        answer(model)
        sync()
        base = model.unload()
    else:
        saved = {k: v.detach().clone() for k, v in base.state_dict().items()}
        adapt(base, [p for p in base.parameters() if p.requires_grad])
        sync()
        a = (time.perf_counter() - t0) * 1e3
        answer(base)
        sync()
        base.load_state_dict(saved)
    t = (time.perf_counter() - t0) * 1e3
    if run > 0:
        static.append(s)
        tta.append(t)
        adapt_ms.append(a)
med = statistics.median
print(f"reference {q['scope']} {device} {os.environ.get('DTYPE', 'f32')}: {len(q['prompt_ids'])} prompt "
      f"tokens, {len(q['pairs'])} pairs, {n_new} new tokens, median of {runs}: static {med(static):.1f} ms, "
      f"tta {med(tta):.1f} ms (adaptation {med(adapt_ms):.1f} ms)")
