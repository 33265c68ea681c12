"""Peer figures for `ttarag bench`: HF transformers (fp32, weights dequantized from the same GGUF)
and llama.cpp (the GGUF as is), on a ~400-token RAG prompt built like ttarag's, 64 new tokens,
2 threads, medians of 5.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch transformers gguf llama-cpp-python
    /tmp/peers/bin/python scripts/reference/bench_peers.py models/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import resource
import statistics
import sys
import time

THREADS = 2
NEW = 64
RUNS = 5


def prompt_text(tok_len, encode, render):
    facts = [json.loads(l)["text"] for l in open("index/samples/qasc/corpus.jsonl")][:200]
    ctx = ""
    for f in facts * 10:
        ctx += f"- {f}\n"
        text = render(f"Context:\n{ctx}\nQuestion: What do plants need to grow?")
        if len(encode(text)) >= tok_len:
            return text
    raise SystemExit("prompt too short")


def bench_hf(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(THREADS)
    d, f = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    render = lambda u: tok.apply_chat_template([{"role": "user", "content": u}], tokenize=False, add_generation_prompt=True)
    ids = tok(prompt_text(400, lambda t: tok(t)["input_ids"], render), return_tensors="pt")["input_ids"]
    pre, dec = [], []
    with torch.inference_mode():
        for run in range(RUNS + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            t1 = time.perf_counter()
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            for _ in range(NEW - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t3 = time.perf_counter()
            if run:
                pre.append(ids.shape[1] / (t1 - t0))
                dec.append((NEW - 1) / (t3 - t2))
    return ids.shape[1], statistics.median(pre), statistics.median(dec)


def bench_llama_cpp(path):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=1024, n_threads=THREADS, n_batch=512, verbose=False)
    render = lambda u: f"<|im_start|>user\n{u}<|im_end|>\n<|im_start|>assistant\n"
    enc = lambda t: llm.tokenize(t.encode(), add_bos=False, special=True)
    ids = enc(prompt_text(400, enc, render))
    pre, dec = [], []
    for run in range(RUNS + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(NEW - 1):
            nxt = int(llm.scores[llm.n_tokens - 1].argmax())
            llm.eval([nxt])
        t2 = time.perf_counter()
        if run:
            pre.append(len(ids) / (t1 - t0))
            dec.append((NEW - 1) / (t2 - t1))
    return len(ids), statistics.median(pre), statistics.median(dec)


if __name__ == "__main__":
    which = sys.argv[2] if len(sys.argv) > 2 else "hf"
    n, p, d = bench_hf(sys.argv[1]) if which == "hf" else bench_llama_cpp(sys.argv[1])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{which}: prompt {n} tokens, prefill {p:.1f} tok/s, decode {d:.1f} tok/s, peak rss {rss:.0f} MB")
